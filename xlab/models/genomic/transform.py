"""The genomic bottleneck as a network transform: chosen weight matrices predicted by a genome."""

from typing import Any

from torch import nn

from xlab.errors import UserError
from xlab.models.genomic.encoding import Encoding
from xlab.models.genomic.fit import fit_to_checkpoint
from xlab.models.genomic.genome import Activation, Genome, Layout, PredictedWeight
from xlab.models.genomic.matrices import Compression, check_smaller, compression, fold, matching, plug_in
from xlab.models.transforms import Transform, register_transform


@register_transform
class GenomicBottleneck(Transform):
    """Weight matrices whose names match ``include`` (fnmatch patterns; None: the block matrices,
    ``matrices.BLOCK_MATRICES``; add ``embed.weight`` for the embedding, tied head included) predicted tile by
    tile by a genome (``xlab.models.genomic.genome``).

    ``tile`` (rows, cols), ``encoding`` of the coordinates, ``layout`` ``per_tile`` or ``shared``, g-nets of
    ``depth`` hidden layers of ``width`` units with ``activation``. The genome's optimizer group has ``lr``
    (None: the optimizer's), ``weight_decay`` and its own gradient-norm clipping ``clip`` (None: clipped with
    the rest by the trainer's ``gradient_clip_val``). ``chunk_tiles`` bounds the memory of a prediction to
    that many tiles' activations, recomputed in the backward (None: all at once, kept).

    ``init_from`` (a dense checkpoint or export of the same architecture) starts training from that model: its
    uncompressed weights are copied and the genome is fitted to its matrices by ``fit_steps`` steps of Adam at
    ``fit_lr`` on the relative squared error. It is a way to start, not part of the network, so it is not
    recorded: a loaded checkpoint does not repeat it.
    """

    name = "genomic"
    export_plain = True

    def __init__(
        self,
        include: list[str] | None = None,
        tile: tuple[int, int] = (128, 128),
        encoding: Encoding = "binary",
        layout: Layout = "per_tile",
        width: int = 32,
        depth: int = 1,
        activation: Activation = "relu",
        lr: float | None = None,
        weight_decay: float = 0.0,
        clip: float | None = 1.0,
        chunk_tiles: int | None = None,
        init_from: str | None = None,
        fit_steps: int = 500,
        fit_lr: float = 1e-2,
    ):
        self.include = include
        self.tile = (int(tile[0]), int(tile[1]))
        self.encoding, self.layout, self.width, self.depth, self.activation = encoding, layout, width, depth, activation
        self.lr, self.weight_decay, self.clip, self.chunk_tiles = lr, weight_decay, clip, chunk_tiles
        self.init_from, self.fit_steps, self.fit_lr = init_from, fit_steps, fit_lr
        if min(*self.tile, width, depth, chunk_tiles or 1, fit_steps + 1) < 1:
            raise UserError("the genomic transform needs tile sizes, width, depth and chunk_tiles of at least 1")

    def settings(self) -> dict[str, Any]:
        return {
            "include": self.include,
            "tile": list(self.tile),
            "encoding": self.encoding,
            "layout": self.layout,
            "width": self.width,
            "depth": self.depth,
            "activation": self.activation,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "clip": self.clip,
            "chunk_tiles": self.chunk_tiles,
        }

    def apply(self, network: nn.Module) -> None:
        if hasattr(network, "genome"):
            raise UserError("the network already has a genome: list the genomic transform once")
        matrices = matching(network, self.include, "the genomic transform")
        kinds = sorted({matrix.kind for matrix in matrices})
        genome = Genome(
            [matrix.shape for matrix in matrices],
            [kinds.index(matrix.kind) for matrix in matrices],
            [matrix.layer for matrix in matrices],
            self.tile,
            self.encoding,
            self.layout,
            self.width,
            self.depth,
            self.activation,
            self.chunk_tiles,
        ).to(matrices[0].parameter.device)
        genome.match_scale([matrix.parameter.detach().square().mean().sqrt().item() for matrix in matrices])
        network.add_module("genome", genome)
        for index, matrix in enumerate(matrices):
            plug_in(matrix, PredictedWeight(genome, index))
        check_smaller(f"the genomic transform ({self.layout}, width {self.width})", self.compression(network))
        if self.init_from is not None:
            fit_to_checkpoint(network, genome, [matrix.names for matrix in matrices], self)

    def materialize(self, network: nn.Module) -> None:
        fold(network, PredictedWeight)
        del network.genome

    def parameter_groups(self, network: nn.Module) -> list[dict[str, Any]]:
        group = {"params": list(network.genome.parameters()), "weight_decay": self.weight_decay, "name": "genome"}
        if self.lr is not None:
            group["lr"] = self.lr
        if self.clip is not None:
            group["clip"] = self.clip
        return [group]

    def report(self, network: nn.Module) -> dict[str, Any]:
        return self.compression(network).record()

    def compression(self, network: nn.Module) -> Compression:
        genome = network.genome
        return compression(network, genome.shapes, sum(p.numel() for p in genome.parameters()))
