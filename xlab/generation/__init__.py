"""One decoding engine for every model: KV-cached greedy decoding, sampling and beam search.

Names and meanings follow Hugging Face ``generate``. A model is anything with
``forward(tokens, positions=, padding=, cache=) -> logits``, ``new_cache(batch, capacity)`` and a
``config.max_positions``, as ``xlab.models.decoder.Decoder`` has. Prompts of different lengths
are left-padded and masked; every prompt is encoded once (prefill), then one token per step.
Encoder-decoders (``translate``) run on the same strategies through ``ConditionedDecoder``.

One concern per module; this package imports no model class, only the interfaces it needs:

- ``protocols``: ``CausalModel``, ``Seq2SeqModel``, ``Cache`` and ``StopCondition``.
- ``config``: ``GenerationConfig``.
- ``processors``: repetition penalty, temperature and top-k/top-p/min-p filtering of logits.
- ``engine``: ``Rows`` (left-padded rows sharing a cache), ``sample`` and ``beam_search`` over token ids.
- ``seq2seq``: ``ConditionedDecoder``, ``TokenHistory``, ``decode_sources`` and ``best_targets``.
- ``text``: ``generate``, ``translate``, ``Generation``, ``StopStrings`` and prompt and source encoding.
"""

from xlab.generation.config import GenerationConfig
from xlab.generation.engine import Hypotheses, Rows, beam_search, sample
from xlab.generation.processors import apply_repetition_penalty, filter_logits, next_token_logits
from xlab.generation.protocols import Cache, CausalModel, ModelConfig, Seq2SeqModel, StopCondition
from xlab.generation.seq2seq import ConditionedDecoder, TokenHistory, best_targets, decode_sources
from xlab.generation.text import Generation, StopStrings, encode_prompt, encode_source, generate, translate

__all__ = [
    "Cache",
    "CausalModel",
    "ConditionedDecoder",
    "Generation",
    "GenerationConfig",
    "Hypotheses",
    "ModelConfig",
    "Rows",
    "Seq2SeqModel",
    "StopCondition",
    "StopStrings",
    "TokenHistory",
    "apply_repetition_penalty",
    "beam_search",
    "best_targets",
    "decode_sources",
    "encode_prompt",
    "encode_source",
    "filter_logits",
    "generate",
    "next_token_logits",
    "sample",
    "translate",
]
