"""Synthetic sources for back-translation: how they are decoded, noised, kept, and what they show of collapse."""

import difflib
import math
import random
from dataclasses import dataclass, field
from typing import Literal

from xlab.data.tokenizer import BOS_ID, EOS_ID
from xlab.errors import UserError

FILLER_ID = BOS_ID  # never in an encoder's input otherwise, so the encoder can learn it as a blank
NEAR_COPY = 0.9  # a synthetic output at least this similar to its input (difflib's ratio) counts as a copy


@dataclass
class SyntheticSources:
    """How the generating direction translates real text into the synthetic sources the other trains on.

    ``strategy``: ``greedy``, ``beam`` (``num_beams``) or ``sample`` (``temperature``, ``top_k``,
    ``top_p``). A translation of an input of n tokens gets at most ``length_scale`` * n +
    ``length_offset`` tokens. One that does not end (no end-of-sequence within that) is dropped,
    or kept as it is with ``without_eos: keep``. Of those kept, only the ``keep_confident`` share with
    the highest mean token log-probability under the generating direction trains the other (1: all);
    a confident translation is more often a right one, and a wrong one teaches the trainee a wrong
    mapping, not just a noisy one. Noise, as in Edunov et al. (2018), on the
    synthetic tokens: each is dropped with ``word_drop``, replaced by a filler token with
    ``filler``, and tokens move by up to ``shuffle_distance`` places (0: none).
    """

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_scale: float = 1.5
    length_offset: int = 5
    without_eos: Literal["drop", "keep"] = "drop"
    keep_confident: float = 1.0
    word_drop: float = 0.0
    filler: float = 0.0
    shuffle_distance: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            (self.length_scale <= 0 or self.length_offset < 0, "length_scale > 0 and length_offset >= 0"),
            (not 0 <= self.word_drop < 1 or not 0 <= self.filler < 1, "word_drop and filler in [0, 1)"),
            (self.shuffle_distance < 0, "shuffle_distance >= 0"),
            (self.num_beams < 2 and self.strategy == "beam", "num_beams >= 2 for beam"),
            (not 0 < self.keep_confident <= 1, "keep_confident in (0, 1]"),
        ]
        for failed, need in problems:
            if failed:
                raise UserError(f"model.synthetic needs {need}")

    def limit(self, length: int) -> int:
        """The most tokens (end-of-sequence included) a translation of ``length`` tokens may have."""
        return max(1, math.ceil(self.length_scale * length + self.length_offset))

    def generation(self, max_new_tokens: int, seed: int) -> dict:
        """The ``GenerationConfig`` settings for this strategy."""
        options: dict = {"max_new_tokens": max_new_tokens, "seed": seed}
        if self.strategy == "beam":
            options["num_beams"] = self.num_beams
        elif self.strategy == "sample":
            options.update(do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return options

    def confidence(self, ids: list[int], score: float) -> float:
        """A decoded translation's mean token log-probability, from the engine's score: the sum for greedy and
        sampling, already divided by the length for beam search (its ``length_penalty`` 1)."""
        return score if self.strategy == "beam" else score / max(len(ids), 1)

    def most_confident(self, confidences: list[float]) -> set[int]:
        """The indices of the ``keep_confident`` share (rounded up) of ``confidences`` that are highest."""
        count = math.ceil(self.keep_confident * len(confidences))
        return set(sorted(range(len(confidences)), key=lambda index: -confidences[index])[:count])

    @property
    def noised(self) -> bool:
        return bool(self.word_drop or self.filler or self.shuffle_distance)

    def noise(self, tokens: list[int], rng: random.Random) -> list[int]:
        """``tokens`` with word drop, filler and local shuffle applied (nothing when none is set)."""
        if not self.noised:
            return tokens
        kept = [t for t in tokens if rng.random() >= self.word_drop] or tokens[:1]
        filled = [FILLER_ID if rng.random() < self.filler else t for t in kept]
        keys = [index + rng.uniform(0, self.shuffle_distance + 1) for index in range(len(filled))]
        return [token for _, token in sorted(zip(keys, filled))] if self.shuffle_distance else filled


def finished(ids: list[int], limit: int) -> tuple[list[int], bool]:
    """A decoded translation cut at ``limit`` tokens: its tokens before end-of-sequence, and whether it ended."""
    ids = ids[:limit]
    return (ids[: ids.index(EOS_ID)], True) if EOS_ID in ids else (ids, False)


def is_copy(output: str, source: str) -> bool:
    """Whether a translation equals, or nearly equals, its source: the sign of a direction that learned to copy."""
    return output == source or difflib.SequenceMatcher(None, output, source).ratio() >= NEAR_COPY


@dataclass
class Diagnostics:
    """What one batch of synthetic sources shows: copies, distinct outputs, length against the input, ended,
    dropped (without an end) and ``unconfident`` (not dropped, but below the ``keep_confident`` cut).

    Two collapses look different here: a direction that copies its input has a high ``copy_rate``; one that
    says the same fluent sentence whatever the input (what a cold start does) has a low ``distinct_rate``
    (distinct outputs per input) and a copy rate of 0.
    """

    count: int = 0
    copies: int = 0
    ended: int = 0
    dropped: int = 0
    unconfident: int = 0
    output_tokens: int = 0
    input_tokens: int = 0
    outputs: set[str] = field(default_factory=set)

    def add(self, output: str, source: str, output_tokens: int, input_tokens: int, ended: bool, kept: bool) -> None:
        self.count += 1
        self.outputs.add(output)
        self.copies += is_copy(output, source)
        self.ended += ended
        self.dropped += not kept
        self.output_tokens += output_tokens
        self.input_tokens += input_tokens

    def rates(self) -> dict[str, float]:
        count = max(self.count, 1)
        return {
            "copy_rate": self.copies / count,
            "distinct_rate": len(self.outputs) / count,
            "eos_rate": self.ended / count,
            "length_ratio": self.output_tokens / max(self.input_tokens, 1),
            "dropped": float(self.dropped),
            "unconfident": float(self.unconfident),
        }
