"""The architecture of a transformer, as one dataclass that every model family reads."""

from dataclasses import dataclass
from typing import Literal

from xlab.errors import UserError

Activation = Literal["gelu", "relu", "relu2", "swiglu"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
Positions = Literal["learned", "sinusoidal", "rotary"]


@dataclass
class TransformerConfig:
    """Shape and options of a transformer stack.

    ``vocab_size`` (the vocabulary the model writes in), ``source_vocab_size`` (the one an
    encoder reads, when it has its own tokenizer; None: ``vocab_size``) and ``context_length``
    are decided by the data and linked in by the CLI; the rest is chosen in YAML.
    ``max_positions`` is how many positions the model supports (default: ``context_length``),
    so a model can be trained on shorter sequences than it will later see.
    ``activation_checkpointing`` recomputes each block's activations in the backward pass
    instead of keeping them: less memory for about one more forward pass of compute.

    Options from the NanoGPT speedrun, all off by default: ``activation: relu2`` (ReLU squared),
    ``qk_norm`` (queries and keys RMS-normalised per head before attention, with a learned gain
    over the head dimension), ``logit_softcap`` (the head's logits become cap * tanh(logits / cap),
    for training, evaluation and generation alike) and ``zero_init_projections`` (the projections
    that write into the residual stream start at zero, so every block starts as the identity).
    """

    vocab_size: int = 0
    context_length: int = 0
    source_vocab_size: int | None = None
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    activation: Activation = "gelu"
    norm: Norm = "layernorm"
    norm_placement: NormPlacement = "pre"
    positions: Positions = "learned"
    max_positions: int | None = None
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    qk_norm: bool = False
    logit_softcap: float | None = None
    zero_init_projections: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.d_model, self.activation)
        if self.max_positions is None:
            self.max_positions = self.context_length
        self.validate()

    def validate(self) -> None:
        """Raise a UserError naming the setting to change when the options do not fit together."""
        if min(self.n_layers, self.d_model, self.n_heads, self.n_kv_heads, self.d_ff) < 1:
            raise UserError("model sizes (n_layers, d_model, n_heads, n_kv_heads, d_ff) must all be at least 1")
        if self.d_model % self.n_heads:
            raise UserError(f"model d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rotary" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head size, got d_model/n_heads = {self.head_dim}")
        if self.context_length > self.max_positions:
            raise UserError(
                f"context length {self.context_length} exceeds the {self.max_positions} positions the model supports: "
                "shorten data.context_length or raise model.arch.max_positions"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model dropout must be in [0, 1), got {self.dropout}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise UserError(f"model logit_softcap must be positive or null, got {self.logit_softcap}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def default_d_ff(d_model: int, activation: str) -> int:
    """4x width, or 8/3x for SwiGLU (same parameter count), rounded up to a multiple of 64."""
    hidden = 4 * d_model if activation != "swiglu" else 8 * d_model // 3
    return -(-hidden // 64) * 64
