"""Which weight matrices a compressing transform replaces, how it plugs a computed weight in, how it folds it
back into a plain parameter, and the exact count of what it saves: shared by the genome and the low-rank
baseline.

A computed weight goes in through ``torch.nn.utils.parametrize`` with ``unsafe=True`` and a parametrization
that ignores its input: the dense parameter is swapped for an empty, non-persistent buffer first, so that the
parametrization's ``original`` is neither a parameter (nothing for the optimizer to hold or decay) nor in the
state dict. Every access to ``module.weight`` (nn.Linear's forward, torch's MultiheadAttention reading
``in_proj_weight``, a tied head) then sees the computed weight, and one ordinary backward reaches whatever
computed it.
"""

import re
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from xlab.errors import UserError

BLOCK_MATRICES = ["*_proj.weight", "*.in_proj_weight", "*.linear1.weight", "*.linear2.weight"]
"""Attention's q/kv/out and the MLP's in/out projections of XLab's blocks, and the same matrices of
torch.nn.Transformer (packed ``in_proj_weight``, ``out_proj``, ``linear1``/``linear2``)."""


@dataclass
class Matrix:
    """One weight matrix: every name it goes by (a tied one has two) and the places it is read from."""

    names: list[str]
    parameter: nn.Parameter
    places: list[tuple[nn.Module, str]]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.parameter.shape
        return rows, cols

    @property
    def kind(self) -> str:
        """The name with layer numbers as ``*``: ``blocks.*.self_attn.q_proj.weight``."""
        return re.sub(r"\.\d+\.", ".*.", f".{self.names[0]}.").strip(".")

    @property
    def layer(self) -> int:
        """The first layer number in the name, 0 for a matrix outside the stacks."""
        found = re.search(r"\.(\d+)\.", f".{self.names[0]}.")
        return int(found.group(1)) if found else 0


def matching(network: nn.Module, patterns: list[str] | None, owner: str) -> list[Matrix]:
    """The 2-D parameters of ``network`` whose name (any of them, for tied ones) matches one of the fnmatch
    ``patterns`` (None: ``BLOCK_MATRICES``, those of them the network has), in the network's order; a UserError
    naming a given pattern that matches none."""
    by_identity: dict[int, Matrix] = {}
    for qualified, parameter in network.named_parameters(remove_duplicate=False):
        module_name, _, attribute = qualified.rpartition(".")
        place = (network.get_submodule(module_name), attribute)
        entry = by_identity.setdefault(id(parameter), Matrix([], parameter, []))
        entry.names.append(qualified)
        entry.places.append(place)
    if patterns is None:
        patterns = [p for p in BLOCK_MATRICES if any(fnmatchcase(n, p) for e in by_identity.values() for n in e.names)]
    for pattern in patterns or BLOCK_MATRICES:
        if not any(fnmatchcase(name, pattern) for entry in by_identity.values() for name in entry.names):
            raise UserError(f"{owner}: the pattern {pattern!r} matches no parameter of the {type(network).__name__}")
    chosen = [
        entry
        for entry in by_identity.values()
        if any(fnmatchcase(name, pattern) for name in entry.names for pattern in patterns)
    ]
    flat = [entry.names[0] for entry in chosen if entry.parameter.dim() != 2]
    if flat:
        raise UserError(f"{owner}: {flat[0]} is not a matrix: narrow the patterns to weight matrices")
    return chosen


def plug_in(matrix: Matrix, computed: nn.Module) -> None:
    """Make every place of ``matrix`` read ``computed()`` (a module whose forward ignores its input)."""
    for module, attribute in matrix.places:
        del module._parameters[attribute]
        module.register_buffer(attribute, torch.empty(0, dtype=matrix.parameter.dtype), persistent=False)
        parametrize.register_parametrization(module, attribute, computed, unsafe=True)
        placeholders = module.parametrizations[attribute]
        placeholders.register_buffer("original", placeholders.original, persistent=False)


def fold(network: nn.Module, kind: type[nn.Module]) -> None:
    """Replace every computed weight of type ``kind`` by a plain parameter holding its value, one per
    computation, so that tied places stay tied."""
    plain: dict[int, nn.Parameter] = {}
    for module in list(network.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for attribute, chain in list(module.parametrizations.items()):
            if not isinstance(chain[0], kind):
                continue
            key = id(chain[0])
            if key not in plain:
                with torch.no_grad():
                    plain[key] = nn.Parameter(getattr(module, attribute).detach().clone())
            parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
            delattr(module, attribute)
            module.register_parameter(attribute, plain[key])


@dataclass(frozen=True)
class Compression:
    """Exact counts, tie-aware (a tied matrix counts once): ``replaced`` weights of the ``matrices`` compressed,
    ``stored`` parameters in their place (a genome, low-rank factors), ``dense`` and ``compressed`` parameters
    of the whole network before and after."""

    matrices: int
    replaced: int
    stored: int
    dense: int
    compressed: int

    @property
    def ratio(self) -> float:
        """Compression of the matrices: weights replaced per stored parameter."""
        return self.replaced / self.stored

    @property
    def model_ratio(self) -> float:
        """Compression of the whole network."""
        return self.dense / self.compressed

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "model_ratio": self.model_ratio}


def compression(network: nn.Module, shapes: list[tuple[int, int]], stored: int) -> Compression:
    """The counts for ``network`` with matrices of ``shapes`` computed from ``stored`` of its parameters."""
    replaced = sum(rows * cols for rows, cols in shapes)
    compressed = sum(parameter.numel() for parameter in network.parameters())
    return Compression(len(shapes), replaced, stored, compressed - stored + replaced, compressed)


def check_smaller(owner: str, counts: Compression) -> None:
    """A UserError when the stored parameters are more than the weights they replace."""
    if counts.stored > counts.replaced:
        raise UserError(
            f"{owner}: its {counts.stored:,} parameters exceed the {counts.replaced:,} weights it replaces: "
            "make it smaller (width, depth, rank) or compress more matrices"
        )
