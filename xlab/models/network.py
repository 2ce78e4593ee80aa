"""What every XLab network shares, and the one place networks are built.

``Network`` holds the parts both the decoder and the encoder-decoder have: token inputs
(embedding scale, absolute positions or rotary, dropout), the output head with optional
tying and logit soft-capping, weight initialisation by module type, the KV cache and the counts (parameters, FLOPs).
``build_network`` constructs a network and applies its recorded transforms
(``xlab.models.transforms``); LightningModules, checkpoint and export loading and the
benchmarks all build through it.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.layers import MLP, Attention, PositionEncoding, RotaryEmbedding, softcap
from xlab.models.transforms import Transform, apply_transforms

INIT_STD = 0.02


class Network(nn.Module):
    """A transformer with token embeddings ``embed`` (and a ``source_embed`` for an encoder) and a ``head``.

    Subclasses create their embedding tables, call ``init_inputs``, build their stacks, then
    ``init_head``; ``transforms`` lists what ``build_network`` applied.
    """

    label: str  # what ``manage.py inspect`` calls it
    supports_cache = True
    embed: nn.Embedding
    head: nn.Linear

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.transforms: list[Transform] = []

    def init_inputs(self, config: TransformerConfig) -> RotaryEmbedding | None:
        """Absolute positions, embedding scale and dropout; the rotary embedding the blocks share, if any."""
        rotary = RotaryEmbedding(config) if config.positions == "rotary" else None
        self.positions = None if rotary else PositionEncoding(config)
        # As in "Attention Is All You Need": without it the fixed unit-scale sinusoids drown
        # the 0.02-scale token embeddings at initialisation.
        self.embed_scale = math.sqrt(config.d_model) if config.positions == "sinusoidal" else 1.0
        self.dropout = nn.Dropout(config.dropout)
        return rotary

    def embed_tokens(self, table: nn.Embedding, tokens: Tensor, positions: Tensor) -> Tensor:
        """Scaled token embeddings plus absolute positions (none with rotary), after dropout."""
        x = table(tokens) * self.embed_scale
        if self.positions is not None:
            x = x + self.positions(positions)
        return self.dropout(x)

    def run_block(self, block: nn.Module, x: Tensor, **inputs: Any) -> Tensor:
        """``block(x, **inputs)``; with ``activation_checkpointing`` while training, its activations are
        recomputed in the backward pass rather than kept (dropout draws the same masks both times)."""
        if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False, **inputs)
        return block(x, **inputs)

    def init_head(self, residual_layers: int) -> None:
        """The output head over the target vocabulary; then every weight initialised, and the head tied if asked."""
        self.head = nn.Linear(self.config.d_model, self.config.vocab_size, bias=False)
        init_weights(self, residual_layers, zero_residual=self.config.zero_init_projections)
        if self.config.tie_embeddings:
            self.head.weight = self.embed.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """The head's logits for the final hidden states, soft-capped when ``logit_softcap`` is set: the one
        place logits are made, so the loss, evaluation and generation all see the same ones."""
        return softcap(self.head(hidden), self.config.logit_softcap)

    def options(self) -> dict[str, Any]:
        """What rebuilds this network besides its architecture and transforms (JSON values, keyword arguments of
        its constructor); recorded in checkpoints and exports. None for most networks."""
        return {}

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` positions, on this model's device and dtype."""
        cfg, weight = self.config, self.embed.weight
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity, weight.dtype, weight.device)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; by default without the embedding tables (tokens and learned positions), as in the
        scaling-law papers."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) as in PaLM's appendix B: 6 N + 12 L d T, where N
        counts the weights of every matrix multiply (the output head included) and L the attention layers.

        For an encoder-decoder, a token is a target token with a source of the same length.
        """
        cfg = self.config
        return 6 * matmul_weights(self) + 12 * self.attention_layers() * cfg.d_model * cfg.context_length

    def attention_layers(self) -> int:
        return sum(isinstance(m, Attention | nn.MultiheadAttention) for m in self.modules())


N = TypeVar("N", bound=Network)


def build_network(
    network: type[N],
    arch: TransformerConfig,
    transforms: Sequence[Transform] = (),
    options: Mapping[str, Any] | None = None,
) -> N:
    """A new ``network`` of architecture ``arch`` (and a family's own ``options``, see ``Network.options``),
    initialised, with ``transforms`` applied in order."""
    model = network(arch, **(options or {}))
    apply_transforms(model, transforms)
    return model


def matmul_weights(model: nn.Module) -> int:
    """Weights that multiply activations: every linear layer's, and the packed projections of torch's attention."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    packed = sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    return linear + packed


def init_weights(model: nn.Module, residual_layers: int, zero_residual: bool = False) -> None:
    """GPT-2 initialisation by module type: N(0, 0.02) for linear layers and embeddings, zero biases, and the
    projections that write into the residual stream scaled by 1/sqrt(2 * layers), or zero with
    ``zero_residual``. Norms keep their ones and zeros. By type rather than by parameter name, so it holds
    whatever a module's parameters are called."""
    residual = {id(projection) for projection in residual_projections(model)}
    residual_std = INIT_STD / math.sqrt(2 * residual_layers)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if id(module) not in residual:
                nn.init.normal_(module.weight, std=INIT_STD)
            elif zero_residual:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, std=residual_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=INIT_STD)
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)


def residual_projections(model: nn.Module) -> list[nn.Linear]:
    """The last linear layer of every attention and MLP branch, XLab's and torch.nn.Transformer's."""
    projections = []
    for module in model.modules():
        if isinstance(module, Attention | MLP | nn.MultiheadAttention):
            projections.append(module.out_proj)
        elif isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            projections.append(module.linear2)
    return projections
