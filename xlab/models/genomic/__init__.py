"""The genomic bottleneck (Shuvaev, Lachi, Koulakov, Zador, PNAS 2024) as a network transform: a genome of
small g-nets predicts a network's weight matrices; and the low-rank factorisation it is measured against.

encoding.py (coordinate features), genome.py (the g-nets, batched over tiles, and the once-per-step cache),
matrices.py (choosing matrices, plugging computed weights in, folding them out, the exact counts),
transform.py (``GenomicBottleneck``), lowrank.py (``LowRank``), fit.py (starting from a dense model).
"""

from xlab.models.genomic.lowrank import LowRank
from xlab.models.genomic.matrices import BLOCK_MATRICES
from xlab.models.genomic.transform import GenomicBottleneck

__all__ = ["BLOCK_MATRICES", "GenomicBottleneck", "LowRank"]
