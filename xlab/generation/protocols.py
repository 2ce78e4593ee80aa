"""What the engine needs of models, caches and stop conditions, declared once as Protocols.

The engine decodes anything that has these shapes, so it imports no model class:
``xlab.models.decoder.Decoder`` is a ``CausalModel``, ``xlab.models.encoder_decoder.EncoderDecoder``
a ``Seq2SeqModel``, and both ``xlab.models.cache.KVCache`` and the uncached ``TokenHistory`` are a
``Cache``.
"""

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor


class Cache(Protocol):
    """A batch's decoding state between steps: how many positions it holds, of how many, on which device;
    ``reorder`` keeps for each new row the state of row ``indices[row]`` (beam search's parents)."""

    @property
    def length(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def reorder(self, indices: Tensor) -> None: ...


class ModelConfig(Protocol):
    """The one setting of a model's configuration the engine reads: how many positions it can attend over."""

    @property
    def max_positions(self) -> int: ...


class CausalModel(Protocol):
    """A model that continues token rows: logits for every position of ``tokens`` given the cached past.

    ``padding`` (batch, cached + new) marks the left padding of each row; ``positions`` are the
    tokens' positions, which padding shifts.
    """

    @property
    def config(self) -> ModelConfig: ...

    def __call__(
        self, tokens: Tensor, positions: Tensor | None = None, padding: Tensor | None = None, cache: Cache | None = None
    ) -> Tensor: ...

    def new_cache(self, batch: int, capacity: int) -> Cache: ...


class Seq2SeqModel(Protocol):
    """What the engine needs of an encoder-decoder (xlab.models.encoder_decoder.EncoderDecoder)."""

    @property
    def config(self) -> ModelConfig: ...

    supports_cache: bool

    def encode(self, source: Tensor, source_padding: Tensor | None = None) -> Tensor: ...

    def decode(
        self,
        target: Tensor,
        memory: Tensor,
        source_padding: Tensor | None = None,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor: ...

    def new_cache(self, batch: int, capacity: int) -> Cache: ...

    def parameters(self) -> Iterator[Tensor]: ...


class StopCondition(Protocol):
    """Decides from the token ids generated so far whether a sequence has ended (besides end-of-sequence)."""

    def found(self, ids: list[int]) -> bool: ...
