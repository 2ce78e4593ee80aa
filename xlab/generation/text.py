"""The text API: prompts and sources in, ``Generation``s out, through the tokenizers and the engine."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from xlab.data.tokenizer import EOS_ID
from xlab.errors import UserError
from xlab.generation.config import GenerationConfig
from xlab.generation.engine import beam_search, sample
from xlab.generation.protocols import CausalModel, Seq2SeqModel
from xlab.generation.seq2seq import decode_sources


@dataclass
class Generation:
    """One continuation: its text (cut at a stop string), token ids and score.

    ``score`` is the length-penalised log-probability for beam search, else the sum of the
    model's log-probabilities of the generated tokens.
    """

    text: str
    token_ids: list[int]
    score: float


def generate(
    model: CausalModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[Generation]]:
    """Continue each prompt; ``config.num_return_sequences`` generations per prompt, best first for beams.

    ``on_step`` receives the token ids generated so far for every row after each step (streaming).

    >>> model, tokenizer = load_model("runs/xlab/checkpoints/last.ckpt")  # xlab.checkpoint
    >>> generate(model, tokenizer, ["The list type"], GenerationConfig(max_new_tokens=40))[0][0].text
    """
    prompt_ids = [
        encode_prompt(tokenizer, prompt, index, model.config.max_positions) for index, prompt in enumerate(prompts)
    ]
    stop = StopStrings(config.stop, tokenizer) if config.stop else None
    decoder = beam_search if config.num_beams > 1 else sample
    return _generations(tokenizer, decoder(model, prompt_ids, config, stop, on_step), stop)


def _generations(
    tokenizer: Tokenizer, results: list[list[tuple[list[int], float]]], stop: "StopStrings | None"
) -> list[list[Generation]]:
    return [
        [Generation(_text(tokenizer, ids, stop), ids, score) for ids, score in per_prompt] for per_prompt in results
    ]


def encode_prompt(tokenizer: Tokenizer, prompt: str, index: int, max_positions: int) -> list[int]:
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError(f"prompt {index + 1} is empty: give some text to continue")
    if len(ids) >= max_positions:
        raise UserError(
            f"prompt {index + 1} has {len(ids)} tokens; the model's context holds {max_positions}, "
            f"so at most {max_positions - 1} leave room to generate: shorten it"
        )
    return ids


def _text(tokenizer: Tokenizer, ids: list[int], stop: "StopStrings | None") -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return stop.cut(text) if stop else text


class StopStrings:
    """Finds the given strings in decoded continuations."""

    def __init__(self, strings: Sequence[str], tokenizer: Tokenizer):
        self.strings = tuple(strings)
        self.tokenizer = tokenizer

    def found(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.strings)

    def partial_match(self, text: str) -> int:
        """Length of the longest ending of ``text`` that begins a stop string (and may yet complete it)."""
        return max((k for s in self.strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def cut(self, text: str) -> str:
        """``text`` up to, not including, the earliest stop string."""
        return text[: min((i for s in self.strings if (i := text.find(s)) >= 0), default=len(text))]


def translate(
    model: Seq2SeqModel,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    texts: Sequence[str],
    config: GenerationConfig,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[Generation]]:
    """Translate each text; like ``generate``, ``config.num_return_sequences`` generations per text.

    >>> loaded = load("runs/translate/checkpoints/best.ckpt")  # xlab.checkpoint
    >>> translate(loaded.model, loaded.source_tokenizer, loaded.tokenizer, ["twelve"], GenerationConfig())[0][0].text
    'dodici'
    """
    sources = [
        encode_source(source_tokenizer, text, index, model.config.max_positions) for index, text in enumerate(texts)
    ]
    stop = StopStrings(config.stop, target_tokenizer) if config.stop else None
    return _generations(target_tokenizer, decode_sources(model, sources, config, stop, on_step), stop)


def encode_source(tokenizer: Tokenizer, text: str, index: int, max_positions: int) -> list[int]:
    """The encoder's input: the text's tokens, then end-of-sequence, as the translation data has it."""
    ids = tokenizer.encode(text).ids
    if not ids:
        raise UserError(f"text {index + 1} is empty: give something to translate")
    if len(ids) >= max_positions:
        raise UserError(
            f"text {index + 1} has {len(ids)} tokens; the model reads at most {max_positions - 1} "
            "(plus end-of-sequence): shorten it"
        )
    return ids + [EOS_ID]
