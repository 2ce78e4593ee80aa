"""The genome: small generator networks (g-nets) that predict tiles of weight matrices from their coordinates.

Every matrix is cut into tiles of one shape (the last row and column of tiles cropped to the matrix); a g-net
maps the features of an entry's row and column inside its tile to the entry's value. ``per_tile`` gives each
tile a g-net of its own (torchGB's layout); ``shared`` has one g-net for every tile of every matrix, which also
reads the tile's position in its matrix, the matrix kind (one-hot) and the layer number. Either way all tiles
are evaluated at once as batched matrix products (per-tile g-nets stacked along a leading dimension).

Predictions are cached until an optimizer steps or a genome parameter changes in place (a load), so the
weights are predicted once per optimizer step however many micro-batches accumulate into it, and evaluation
and generation reuse them. Through ``Predict`` every micro-batch's ordinary backward reaches the g-nets from
that one prediction: it keeps the g-nets' graph for repeated backwards, or, with ``chunk_tiles``, keeps
nothing and recomputes ``chunk_tiles`` tiles at a time in the backward (memory bounded by a chunk).
"""

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.optimizer import register_optimizer_step_post_hook

from xlab.models.genomic.encoding import Encoding, encode

OPTIMIZER_STEPS = [0]
"""Optimizer steps taken in this process, counted by torch's global step hook: fused optimizers update
parameters without bumping their version counters, so those alone would not say the genome changed."""


def _count_step(*_: object) -> None:
    OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)

Layout = Literal["per_tile", "shared"]
Activation = Literal["relu", "gelu", "tanh", "silu"]
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


class Genome(nn.Module):
    """G-nets predicting matrices of ``shapes``; ``kinds`` and ``layers`` (one per matrix) are what a shared
    g-net is told about each matrix. ``depth`` hidden layers of ``width`` units; ``gain``, one learned scale per
    matrix, starts so that each predicted matrix has the root mean square of its dense initialisation."""

    def __init__(
        self,
        shapes: list[tuple[int, int]],
        kinds: list[int],
        layers: list[int],
        tile: tuple[int, int],
        encoding: Encoding = "binary",
        layout: Layout = "per_tile",
        width: int = 32,
        depth: int = 1,
        activation: Activation = "relu",
        chunk_tiles: int | None = None,
    ):
        super().__init__()
        self.shapes, self.tile, self.layout, self.chunk_tiles = shapes, tile, layout, chunk_tiles
        self.activation = ACTIVATIONS[activation]
        self.grids = [(math.ceil(rows / tile[0]), math.ceil(cols / tile[1])) for rows, cols in shapes]
        self.register_buffer("positions", pairs(encode(tile[0], encoding), encode(tile[1], encoding)), persistent=False)
        owners = [index for index, (rows, cols) in enumerate(self.grids) for _ in range(rows * cols)]
        self.register_buffer("tile_matrix", torch.tensor(owners), persistent=False)
        self.tiles = len(owners)
        groups = self.tiles if layout == "per_tile" else 1
        fan_in = self.positions.size(1)
        if layout == "shared":
            self.register_buffer("tile_features", tile_features(self.grids, kinds, layers, encoding), persistent=False)
            fan_in += self.tile_features.size(1)
            self.tile_weight = nn.Parameter(uniform((self.tile_features.size(1), width), fan_in))
        self.first = nn.Parameter(uniform((groups, self.positions.size(1), width), fan_in))
        self.first_bias = nn.Parameter(uniform((groups, 1, width), fan_in))
        self.hidden = nn.ParameterList(nn.Parameter(uniform((groups, width, width), width)) for _ in range(depth - 1))
        self.hidden_bias = nn.ParameterList(nn.Parameter(uniform((groups, 1, width), width)) for _ in range(depth - 1))
        self.last = nn.Parameter(uniform((groups, width, 1), width))
        self.last_bias = nn.Parameter(uniform((groups, 1, 1), width))
        self.gain = nn.Parameter(torch.ones(len(shapes)))
        self.offsets = [0]
        for rows, cols in shapes:
            self.offsets.append(self.offsets[-1] + rows * cols)
        self.predictions = 0  # how many times the weights were predicted (not served from the cache)
        self._cached: Tensor | None = None
        self._key: tuple = ()

    def forward(self, start: int, stop: int) -> Tensor:
        """Entries (stop - start, tile rows * tile cols) of tiles ``start:stop``, row-major inside each tile."""
        own = slice(start, stop) if self.layout == "per_tile" else slice(None)
        h = self.positions @ self.first[own] + self.first_bias[own]
        if self.layout == "shared":
            h = h + (self.tile_features[start:stop] @ self.tile_weight)[:, None]
        h = self.activation(h)
        for weight, bias in zip(self.hidden, self.hidden_bias, strict=True):
            h = self.activation(h @ weight[own] + bias[own])
        out = (h @ self.last[own] + self.last_bias[own]).squeeze(-1)
        return out * self.gain[self.tile_matrix[start:stop]][:, None]

    def assemble(self, tiles: Tensor) -> Tensor:
        """All matrices, cropped and flattened one after the other, from the entries of all tiles."""
        rows, cols = self.tile
        matrices, start = [], 0
        for (height, width), (grid_rows, grid_cols) in zip(self.shapes, self.grids, strict=True):
            stop = start + grid_rows * grid_cols
            grid = tiles[start:stop].reshape(grid_rows, grid_cols, rows, cols).transpose(1, 2)
            matrices.append(grid.reshape(grid_rows * rows, grid_cols * cols)[:height, :width].reshape(-1))
            start = stop
        return torch.cat(matrices)

    def evaluate(self, parameters: list[Tensor], start: int, stop: int) -> Tensor:
        """``forward`` with ``parameters`` (in ``self.parameters()`` order) in place of the genome's own."""
        names = [name for name, _ in self.named_parameters()]
        return functional_call(self, dict(zip(names, parameters, strict=True)), (start, stop))

    def chunks(self) -> list[tuple[int, int]]:
        step = self.chunk_tiles or self.tiles
        return [(start, min(start + step, self.tiles)) for start in range(0, self.tiles, step)]

    def predicted(self) -> Tensor:
        """Every predicted matrix, flattened one after the other (``matrix`` cuts one out), from the cache
        unless an optimizer stepped, a genome parameter changed, or a graph is wanted and the cached prediction
        has none."""
        parameters = list(self.parameters())
        key = (OPTIMIZER_STEPS[0], *((p._version, p.data_ptr(), p.dtype) for p in parameters))
        wants_graph = torch.is_grad_enabled() and any(p.requires_grad for p in parameters)
        if self._cached is None or key != self._key or (wants_graph and self._cached.grad_fn is None):
            self._cached = None  # the old prediction and its graph go before the new one is made
            with torch.autocast(self.positions.device.type, enabled=False):
                if wants_graph:
                    self._cached = Predict.apply(self, *parameters)
                else:
                    self._cached = self.assemble(torch.cat([self(start, stop) for start, stop in self.chunks()]))
            self._key = key
            self.predictions += 1
        return self._cached

    def matrix(self, index: int) -> Tensor:
        """Predicted matrix ``index``."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.predicted()[start:stop].view(self.shapes[index])

    @torch.no_grad()
    def match_scale(self, targets: list[float]) -> None:
        """Set each matrix's gain so that its prediction has root mean square ``targets[index]``."""
        self.gain.fill_(1.0)
        flat = self.assemble(torch.cat([self(start, stop) for start, stop in self.chunks()]))
        for index, target in enumerate(targets):
            values = flat[self.offsets[index] : self.offsets[index + 1]]
            self.gain[index] = target / values.square().mean().sqrt().clamp_min(1e-12)


class Predict(torch.autograd.Function):
    """The genome's parameters -> every predicted matrix (``Genome.assemble``'s layout), backward-able once
    per micro-batch from one forward."""

    @staticmethod
    def forward(ctx, genome: Genome, *parameters: Tensor) -> Tensor:
        ctx.genome, ctx.parameters = genome, parameters
        if genome.chunk_tiles is None:
            with torch.enable_grad():
                ctx.leaves = [p.detach().requires_grad_() for p in parameters]
                ctx.out = genome.assemble(genome.evaluate(ctx.leaves, 0, genome.tiles))
            return ctx.out.detach()
        return genome.assemble(torch.cat([genome.evaluate(list(parameters), *chunk) for chunk in genome.chunks()]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        genome = ctx.genome
        if genome.chunk_tiles is None:
            grads = torch.autograd.grad(ctx.out, ctx.leaves, grad, retain_graph=True, allow_unused=True)
            return None, *grads
        with torch.enable_grad():
            blank = torch.zeros(genome.tiles, genome.positions.size(0), dtype=grad.dtype, device=grad.device)
            blank.requires_grad_()
            (per_tile,) = torch.autograd.grad(genome.assemble(blank), blank, grad)
            totals = [torch.zeros_like(p) for p in ctx.parameters]
            for start, stop in genome.chunks():
                leaves = [p.detach().requires_grad_() for p in ctx.parameters]
                out = genome.evaluate(leaves, start, stop)
                parts = torch.autograd.grad(out, leaves, per_tile[start:stop], allow_unused=True)
                for total, part in zip(totals, parts, strict=True):
                    if part is not None:
                        total += part
        return None, *totals


class PredictedWeight(nn.Module):
    """A parametrization that ignores the (empty) original and reads matrix ``index`` of ``genome``; the genome
    is held by reference, not as a submodule, so that its parameters are the network's once."""

    def __init__(self, genome: Genome, index: int):
        super().__init__()
        self.read = partial(genome.matrix, index)

    @torch.compiler.disable  # the cache is Python state: a compiled network breaks its graph here, not recompiles
    def forward(self, _: Tensor) -> Tensor:
        return self.read()


def pairs(row: Tensor, col: Tensor) -> Tensor:
    """Features (rows * cols, row features + column features) of every (row, column) pair, row-major."""
    return torch.cat((row.repeat_interleave(col.size(0), dim=0), col.repeat(row.size(0), 1)), dim=1)


def tile_features(grids: list[tuple[int, int]], kinds: list[int], layers: list[int], encoding: Encoding) -> Tensor:
    """Features of each tile for a shared g-net: its row and column in the matrix's grid of tiles, the matrix
    kind one-hot, and the layer number."""
    grid_rows, grid_cols = max(rows for rows, _ in grids), max(cols for _, cols in grids)
    row, col, layer = encode(grid_rows, encoding), encode(grid_cols, encoding), encode(max(layers) + 1, encoding)
    kind = torch.eye(max(kinds) + 1)
    features = []
    for (rows, cols), matrix_kind, matrix_layer in zip(grids, kinds, layers, strict=True):
        about = torch.cat((kind[matrix_kind], layer[matrix_layer])).expand(rows * cols, -1)
        features.append(torch.cat((pairs(row[:rows], col[:cols]), about), dim=1))
    return torch.cat(features)


def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """nn.Linear's initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)
