"""Encoder-decoder models on the same strategies: given its encoded sources, the decoder is a causal model
of the target (``ConditionedDecoder``), decoded from the start token."""

from collections.abc import Callable

import torch
from torch import Tensor

from xlab.data.tokenizer import BOS_ID, PAD_ID
from xlab.generation.config import GenerationConfig
from xlab.generation.engine import beam_search, sample
from xlab.generation.protocols import Cache, Seq2SeqModel, StopCondition


@torch.inference_mode()
def decode_sources(
    model: Seq2SeqModel,
    sources: list[list[int]],
    config: GenerationConfig,
    stop: StopCondition | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
    cached: bool = True,
) -> list[list[tuple[list[int], float]]]:
    """Decode target token ids for encoder inputs ``sources``, starting from the start token; per source a list
    of (ids, score). ``cached=False`` re-runs the decoder over the whole prefix at every step instead."""
    decoder = ConditionedDecoder(model, sources, cached)
    strategy = beam_search if config.num_beams > 1 else sample
    return strategy(decoder, [[BOS_ID]] * len(sources), config, stop, on_step)


def best_targets(model: Seq2SeqModel, sources: list[list[int]], num_beams: int, max_new_tokens: int) -> list[list[int]]:
    """The most likely target ids of each source, greedy or the best of ``num_beams`` beams: how a translator
    decodes for validation, test and predict (``xlab.callbacks.EngineDecoding`` hands it this function)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [per_source[0][0] for per_source in decode_sources(model, sources, config)]


class TokenHistory:
    """Stands in for the KV cache when decoding without one: it keeps the tokens, not their keys and values."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
        self.capacity = capacity
        self.device = device

    @property
    def length(self) -> int:
        return self.tokens.size(1)

    def reorder(self, indices: Tensor) -> None:
        self.tokens = self.tokens[indices]


class ConditionedDecoder:
    """An encoder-decoder's decoder bound to encoded sources: the causal model the engine decodes.

    The encoder runs once, here. The engine puts the copies of each source (beams, return
    sequences) in adjacent rows and only ever reorders rows among the copies of one source,
    which share their encoder output; so the output is expanded once, when the cache is made.
    Every prompt is the start token alone, so rows never need padding.
    """

    def __init__(self, model: Seq2SeqModel, sources: list[list[int]], cached: bool = True):
        self.model, self.config = model, model.config
        self.cached = cached and model.supports_cache
        device = next(model.parameters()).device
        length = max(map(len, sources))
        source = torch.tensor([ids + [PAD_ID] * (length - len(ids)) for ids in sources], device=device)
        self.padding = torch.tensor([[i >= len(ids) for i in range(length)] for ids in sources], device=device)
        self.memory = model.encode(source, self.padding)

    def new_cache(self, batch: int, capacity: int) -> Cache:
        copies = batch // len(self.memory)
        self.row_memory = self.memory.repeat_interleave(copies, dim=0)
        self.row_padding = self.padding.repeat_interleave(copies, dim=0)
        if self.cached:
            return self.model.new_cache(batch, capacity)
        return TokenHistory(batch, capacity, self.memory.device)

    def __call__(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        if isinstance(cache, TokenHistory):
            cache.tokens = torch.cat([cache.tokens, tokens], dim=1)
            return self.model.decode(cache.tokens, self.row_memory, self.row_padding)[:, -tokens.size(1) :]
        return self.model.decode(tokens, self.row_memory, self.row_padding, positions, padding, cache)
