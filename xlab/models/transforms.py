"""Network transforms: recorded, reversible changes applied to a built network.

A transform (the genomic bottleneck, per-direction adapters) changes how a network computes
its weights or adds parameters, after the network is built and initialised. Each one is
recorded by name with its settings (``record``) in the hyperparameters of a checkpoint and in
the metadata of an export, so that loading rebuilds the same network before reading its
weights; ``materialize`` folds every transform into plain weights, leaving the network a
transform-free one with the same function. A transform may give its own parameters their own
learning rate and weight decay (``parameter_groups``).

In YAML, transforms are a list under ``model.init_args.transforms``, each chosen by
``class_path`` like any other class.
"""

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from torch import nn

from xlab.errors import UserError


class Transform:
    """A change to a built network. Subclasses set ``name``, take their settings as keyword arguments to
    ``__init__`` (returned by ``settings``) and implement ``apply`` and ``materialize``."""

    name: ClassVar[str]
    export_plain: ClassVar[bool] = False
    """Whether an export folds this transform into plain weights unless asked for the compact form."""

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this transform: JSON values only."""
        return {}

    def apply(self, network: nn.Module) -> None:
        """Change ``network`` in place."""
        raise NotImplementedError

    def materialize(self, network: nn.Module) -> None:
        """Undo the change in place, leaving plain parameters that compute what the transformed network did."""
        raise NotImplementedError

    def parameter_groups(self, network: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups for parameters this transform owns (``params`` plus any of ``lr``,
        ``weight_decay``, ``name``); parameters in none of them get the optimizer's defaults."""
        return []

    def report(self, network: nn.Module) -> dict[str, Any]:
        """What the transform did to ``network``, as JSON values (a compression's counts): logged as training
        starts, stored in checkpoints, shown by ``manage.py inspect``."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


TRANSFORMS: dict[str, type[Transform]] = {}


def register_transform(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make ``cls`` loadable from its recorded ``name``."""
    if TRANSFORMS.get(cls.name, cls) is not cls:
        raise ValueError(f"two transforms are named {cls.name!r}")
    TRANSFORMS[cls.name] = cls
    return cls


def record(transforms: Iterable[Transform]) -> list[dict[str, Any]]:
    """The transforms as JSON-ready records: ``{"name": ..., "settings": {...}}``, in the order applied."""
    return [{"name": transform.name, "settings": transform.settings()} for transform in transforms]


def from_records(records: Sequence[dict[str, Any]], origin: str = "the model") -> list[Transform]:
    """The transforms ``record`` wrote; a UserError for one this XLab does not know."""
    transforms = []
    for entry in records:
        cls = TRANSFORMS.get(entry["name"])
        if cls is None:
            known = ", ".join(sorted(TRANSFORMS)) or "none"
            raise UserError(f"{origin} uses the transform {entry['name']!r}, which this XLab lacks (it has {known})")
        transforms.append(cls(**entry["settings"]))
    return transforms


def as_config(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded transforms as the CLI's YAML names them: ``class_path`` and ``init_args``."""
    classes = [from_records([entry])[0].__class__ for entry in records]
    return [
        {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": entry["settings"]}
        for cls, entry in zip(classes, records, strict=True)
    ]


def apply_transforms(network: nn.Module, transforms: Sequence[Transform]) -> None:
    """Apply ``transforms`` in order and note them on ``network.transforms``."""
    for transform in transforms:
        transform.apply(network)
    network.transforms = [*getattr(network, "transforms", []), *transforms]


def materialize(network: nn.Module) -> nn.Module:
    """Fold every transform of ``network`` into plain weights, last applied first; returns ``network``."""
    for transform in reversed(getattr(network, "transforms", [])):
        transform.materialize(network)
    network.transforms = []
    return network


def reports(network: nn.Module) -> list[str]:
    """One line per transform of ``network`` that reports something: its name and ``report``, numbers
    readable (``ratio 19.50``, ``replaced 1,234``)."""
    lines = []
    for transform in getattr(network, "transforms", []):
        if report := transform.report(network):
            shown = ", ".join(f"{key.replace('_', ' ')} {readable(value)}" for key, value in report.items())
            lines.append(f"{transform.name}: {shown}")
    return lines


def readable(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
