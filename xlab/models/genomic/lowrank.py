"""The low-rank baseline: each chosen matrix W (rows x cols) replaced by the product A @ B of rank ``rank``."""

import math
from typing import Any

import torch
from torch import Tensor, nn

from xlab.models.genomic.matrices import Compression, check_smaller, compression, fold, matching, plug_in
from xlab.models.transforms import Transform, register_transform


class Factors(nn.Module):
    """A parametrization that ignores the (empty) original and returns ``left @ right``."""

    def __init__(self, rows: int, cols: int, rank: int, std: float):
        super().__init__()
        factor_std = math.sqrt(std / math.sqrt(rank))  # the product of two such factors has entries of std ``std``
        self.left = nn.Parameter(torch.randn(rows, rank) * factor_std)
        self.right = nn.Parameter(torch.randn(rank, cols) * factor_std)

    def forward(self, _: Tensor) -> Tensor:
        return self.left @ self.right


@register_transform
class LowRank(Transform):
    """Matrices whose names match ``include`` (as in ``GenomicBottleneck``) factorised at ``rank`` (at most
    each matrix's smaller side), the factors initialised so the product has the dense initialisation's scale."""

    name = "low-rank"
    export_plain = True

    def __init__(self, rank: int = 16, include: list[str] | None = None):
        self.rank, self.include = rank, include

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "include": self.include}

    def apply(self, network: nn.Module) -> None:
        matrices = matching(network, self.include, "the low-rank transform")
        for matrix in matrices:
            rows, cols = matrix.shape
            std = matrix.parameter.detach().square().mean().sqrt().item()
            factors = Factors(rows, cols, min(self.rank, rows, cols), std).to(matrix.parameter.device)
            plug_in(matrix, factors)
        check_smaller(f"the low-rank transform (rank {self.rank})", self.compression(network))

    def materialize(self, network: nn.Module) -> None:
        fold(network, Factors)

    def report(self, network: nn.Module) -> dict[str, Any]:
        return self.compression(network).record()

    def compression(self, network: nn.Module) -> Compression:
        factors = {id(m): m for m in network.modules() if isinstance(m, Factors)}.values()
        shapes = [(m.left.size(0), m.right.size(1)) for m in factors]
        return compression(network, shapes, sum(m.left.numel() + m.right.numel() for m in factors))
