"""The key/value cache: attention's past keys and values, kept apart from attention itself."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to ``capacity`` positions.

    Each forward pass appends its new positions in every layer, then ``advance`` moves the
    write position once; ``reorder`` follows beam search's choice of parent sequences.
    An encoder-decoder's cross-attention keys and values are kept too, in ``cross``.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.cross: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def append(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``keys``/``values`` (batch, heads, new, head_dim) after the cached ones; return all of them."""
        end = self.length + keys.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} requested")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def reorder(self, indices: Tensor) -> None:
        """Keep, for each new batch row, the cache of row ``indices[row]``; only the filled positions are copied."""
        filled = slice(0, self.length)
        self.keys[:, :, :, filled] = self.keys[:, indices, :, filled]
        self.values[:, :, :, filled] = self.values[:, indices, :, filled]
        self.cross = {layer: (keys[indices], values[indices]) for layer, (keys, values) in self.cross.items()}

    def cross_attention(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Keys and values of cross-attention in ``layer``: computed on first use, then reused, since the
        encoder output they come from does not change while decoding."""
        if layer not in self.cross:
            self.cross[layer] = compute()
        return self.cross[layer]


@dataclass
class LayerCache:
    """One layer's view of a KVCache, handed to that layer's attention."""

    cache: KVCache
    index: int

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.append(self.index, keys, values)

    def cross_attention(self, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return self.cache.cross_attention(self.index, compute)
