"""Deterministic document-level train / val / test / predict splits."""

from dataclasses import asdict, dataclass

import numpy as np

from xlab.errors import UserError


@dataclass
class SplitFractions:
    """Fractions of the documents in each split; what they leave unassigned is not used."""

    train: float = 0.9
    val: float = 0.05
    test: float = 0.025
    predict: float = 0.025

    def __post_init__(self) -> None:
        fractions = asdict(self)
        if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
            raise UserError(f"data.splits must be non-negative and sum to at most 1, got {fractions}")


def split_indices(num_documents: int, fractions: SplitFractions, seed: int) -> dict[str, np.ndarray]:
    """Disjoint, sorted document indices per split, the same for the same count, fractions and seed."""
    order = np.random.default_rng(seed).permutation(num_documents)
    names = list(asdict(fractions))
    bounds = np.round(np.cumsum([0.0, *asdict(fractions).values()]) * num_documents).astype(int)
    return {name: np.sort(order[start:stop]) for name, start, stop in zip(names, bounds[:-1], bounds[1:])}
