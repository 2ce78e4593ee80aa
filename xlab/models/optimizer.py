"""The optimizer factory: AdamW, or Muon for the hidden weight matrices with AdamW for the rest.

``split_parameters`` sorts a network's trainable parameters into named groups (a network transform
may claim some for groups of its own), ``build_optimizer`` makes the optimizer over them, and
``group_table`` describes the result for the log. The learning-rate schedule is in schedule.py.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.optim._muon
from torch import nn

from xlab.errors import UserError
from xlab.models.network import Network
from xlab.models.schedule import ScheduleShape

MUON_GROUP = "hidden_matrices"  # the one group Muon steps; every other group is AdamW's
ParameterGroup = dict[str, Any]


@dataclass
class OptimizerConfig:
    """The optimizer and its learning-rate schedule.

    ``name: adamw``: AdamW over everything, decoupled weight decay on weight matrices only.
    ``name: muon``: ``torch.optim.Muon`` (momentum, then the update orthogonalised by Newton-Schulz
    steps) with its own ``muon_lr``, ``muon_momentum``, ``muon_weight_decay`` and ``muon_adjust_lr``
    (torch's rule for scaling the rate by the matrix's shape) for the 2-D weight matrices inside the
    blocks, its Newton-Schulz steps in ``muon_precision`` (``auto``: bfloat16 on GPUs as torch does,
    float32 on CPUs, whose bfloat16 matmul can be 40x slower than float32's); AdamW with ``lr`` for
    the embeddings, the head, norms and biases, and for any group a network transform claims (its
    rate and decay were chosen for AdamW).

    The schedule (schedule.py) multiplies every group's rate alike: linear warm-up over
    ``warmup_steps``, then ``cosine`` decay, or ``trapezoid`` (constant, then linear decay over the
    last ``decay_fraction`` of the run), down to ``min_lr_ratio`` times the peak at ``decay_steps``.
    ``decay_steps`` null: the run's last step, as the budget that ends it allows (horizon.py).
    """

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    muon_precision: Literal["auto", "bf16", "fp32"] = "auto"
    schedule: ScheduleShape = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("model.optimizer needs lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1 or self.muon_weight_decay < 0:
            raise UserError("model.optimizer needs muon_lr > 0, 0 <= muon_momentum < 1 and muon_weight_decay >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"model.optimizer.decay_fraction must be in (0, 1], got {self.decay_fraction}")


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with a choice of precision for its Newton-Schulz steps.

    torch orthogonalises in bfloat16, which GPUs multiply fast; CPUs without bfloat16 matrix units
    (AVX2, most of AVX-512) emulate it, and on the 2-core machine one step of the default model took
    9 s against 0.2 s in float32. ``precision: fp32`` (or ``auto`` on a CPU tensor) runs torch's own
    step with the same iteration in float32; everything else (momentum, Nesterov, the rate's shape
    rule, weight decay, the state) stays torch's.
    """

    def __init__(self, params: Any, precision: Literal["auto", "bf16", "fp32"] = "auto", **options: Any):
        super().__init__(params, **options)
        self.precision = precision

    def step(self, closure: Any = None) -> Any:
        if self.precision == "bf16":
            return super().step(closure)
        with _newton_schulz_in_float32(cpu_only=self.precision == "auto"):
            return super().step(closure)


@contextmanager
def _newton_schulz_in_float32(cpu_only: bool) -> Iterator[None]:
    """Swap torch's bfloat16 Newton-Schulz for a float32 one (on CPU tensors only, if ``cpu_only``) for one step."""
    module = torch.optim._muon
    bfloat16 = module._zeropower_via_newtonschulz

    def orthogonalise(
        grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
    ) -> torch.Tensor:
        if cpu_only and grad.device.type != "cpu":
            return bfloat16(grad, coefficients, steps, eps)
        return newton_schulz(grad.float(), coefficients, steps, eps).to(grad.dtype)

    module._zeropower_via_newtonschulz = orthogonalise
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = bfloat16


def newton_schulz(
    matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration in ``matrix``'s own dtype: singular values pushed towards 1
    (into roughly 0.7-1.2), singular vectors kept."""
    a, b, c = coefficients
    wide = matrix.T if matrix.size(0) > matrix.size(1) else matrix
    x = wide / wide.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if matrix.size(0) > matrix.size(1) else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped as one optimizer.

    Lightning's automatic optimization takes exactly one optimizer (a list needs manual
    optimization, which would give up its gradient clipping, accumulation and closures). So the
    two are one ``Optimizer``: its ``param_groups`` are AdamW's then Muon's, the same dicts, so the
    LR scheduler, gradient clipping, ``zero_grad`` and the LR monitor see every group; its ``state``
    is one dict the two share (their parameters are disjoint), so ``Optimizer``'s own
    ``state_dict`` and ``load_state_dict`` save and restore both for checkpoints and resume.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon):
        self.adamw, self.muon = adamw, muon
        super().__init__([*adamw.param_groups, *muon.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups and state (``load_state_dict`` replaces them)."""
        count = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss


def split_parameters(
    network: nn.Module, parameters: Iterable[nn.Parameter], config: OptimizerConfig, claimed: list[ParameterGroup]
) -> list[ParameterGroup]:
    """The trainable ``parameters`` in named groups, each in exactly one; ``claimed`` (a transform's) kept as given.

    AdamW: ``matrices`` (weight decay) and ``norms_biases`` (none). Muon: ``hidden_matrices`` (the 2-D
    weights inside the blocks, for Muon), then for AdamW ``embeddings_head`` (weight decay) and
    ``norms_biases``.
    """
    owned = {id(parameter) for group in claimed for parameter in group["params"]}
    rest = [p for p in parameters if p.requires_grad and id(p) not in owned]
    decay, matrices = config.weight_decay, [p for p in rest if p.dim() >= 2]
    vectors = {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "name": "norms_biases"}
    if config.name == "adamw":
        return [{"params": matrices, "weight_decay": decay, "name": "matrices"}, vectors, *claimed]
    outer = {id(p) for p in outer_parameters(network)}
    hidden = {id(p) for p in matrices if p.dim() == 2 and id(p) not in outer}  # Muon takes 2-D tensors only
    return [
        {"params": [p for p in matrices if id(p) in hidden], "name": MUON_GROUP},
        {"params": [p for p in matrices if id(p) not in hidden], "weight_decay": decay, "name": "embeddings_head"},
        vectors,
        *claimed,
    ]


def outer_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The weights outside the blocks: every embedding table (tokens, source tokens, learned positions) and the
    head of every network in ``network`` (a cycle translator holds two)."""
    tables = [module.weight for module in network.modules() if isinstance(module, nn.Embedding)]
    heads = [module.head.weight for module in network.modules() if isinstance(module, Network)]
    return [*tables, *heads]


def build_optimizer(groups: list[ParameterGroup], config: OptimizerConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW over ``groups``, or with ``name: muon`` Muon over the ``hidden_matrices`` group and AdamW over the
    rest. ``fused``: AdamW's fused kernel."""
    adamw_groups = [group for group in groups if group.get("name") != MUON_GROUP or config.name == "adamw"]
    adamw = torch.optim.AdamW(adamw_groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused)
    if config.name == "adamw":
        return adamw
    muon = Muon(
        [group for group in groups if group.get("name") == MUON_GROUP],
        precision=config.muon_precision,
        lr=config.muon_lr,
        momentum=config.muon_momentum,
        weight_decay=config.muon_weight_decay,
        adjust_lr_fn=config.muon_adjust_lr,
    )
    return MuonWithAdamW(adamw, muon)


def group_table(optimizer: torch.optim.Optimizer) -> str:
    """A short table of the parameter groups: which optimizer steps each, its size, peak rate and weight decay."""
    muon = {id(group) for group in optimizer.muon.param_groups} if isinstance(optimizer, MuonWithAdamW) else set()
    rows = [("optimizer", "group", "tensors", "parameters", "peak lr", "weight decay")]
    for index, group in enumerate(optimizer.param_groups):
        rows.append(
            (
                "muon" if id(group) in muon else "adamw",
                group.get("name", f"group {index}"),
                str(len(group["params"])),
                f"{sum(p.numel() for p in group['params']):,}",
                f"{group.get('initial_lr', group['lr']):.3g}",
                f"{group['weight_decay']:g}",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
