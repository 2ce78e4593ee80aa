"""``GenerationConfig``: how to continue a prompt, checked once when it is made."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from xlab.errors import UserError


@dataclass
class GenerationConfig:
    """How to continue a prompt; the names and meanings of Hugging Face ``generate``.

    ``temperature`` 0 means greedy. ``stop``: strings that end a sequence; the returned text
    ends just before the first of them. ``context_policy``: when the model's context is full,
    ``stop`` there, or ``slide`` the window (keep the last half and re-encode it).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    context_policy: Literal["stop", "slide"] = "stop"

    def __post_init__(self) -> None:
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature < 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k < 0, f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (not 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams < 1, f"num_beams must be at least 1, got {self.num_beams}"),
            (self.num_return_sequences < 1, "num_return_sequences must be at least 1"),
            (
                self.num_beams > 1 and self.num_return_sequences > self.num_beams,
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})",
            ),
            (
                self.num_beams == 1 and not self.sampling and self.num_return_sequences > 1,
                "greedy decoding returns one sequence: use sampling or beam search for num_return_sequences > 1",
            ),
            (self.num_beams > 1 and self.do_sample, "num_beams > 1 cannot be combined with do_sample: drop one"),
            (
                self.num_beams > 1 and self.context_policy == "slide",
                "context_policy 'slide' works with greedy decoding and sampling, not with num_beams > 1",
            ),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for failed, message in problems:
            if failed:
                raise UserError(message)

    @property
    def sampling(self) -> bool:
        return self.do_sample and self.temperature > 0
