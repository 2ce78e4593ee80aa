"""A decoder-only (GPT-style) transformer assembled from layers.py. Plain PyTorch, no Lightning."""

import math

import torch
from torch import Tensor, nn

from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.layers import Block, PositionEncoding, RotaryEmbedding, init_gpt2, make_norm


class Decoder(nn.Module):
    """Token embedding, positions, a stack of causal blocks and a language-model head."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        rotary = RotaryEmbedding(config) if config.positions == "rotary" else None
        self.positions = None if rotary else PositionEncoding(config)
        # As in "Attention Is All You Need": without it the fixed unit-scale sinusoids drown
        # the 0.02-scale token embeddings at initialisation.
        self.embed_scale = math.sqrt(config.d_model) if config.positions == "sinusoidal" else 1.0
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, rotary=rotary) for _ in range(config.n_layers))
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        init_gpt2(self, config.n_layers)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time); position t sees tokens 0..t only.

        For generation: ``positions`` (time,) or (batch, time) default to those after the cached
        ones; ``mask`` (see layers.attention_mask) replaces plain causal attention, for padding;
        ``cache`` receives this call's keys and values.
        """
        time = tokens.size(1)
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + time, device=tokens.device)
        x = self.embed(tokens) * self.embed_scale
        if self.positions is not None:
            x = x + self.positions(positions)
        x = self.dropout(x)
        for index, block in enumerate(self.blocks):
            layer_cache = cache.layer(index) if cache is not None else None
            x = block(x, mask=mask, is_causal=mask is None, positions=positions, cache=layer_cache)
        if cache is not None:
            cache.advance(time)
        return self.head(self.final_norm(x))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``capacity`` positions, on this model's device and dtype."""
        cfg, weight = self.config, self.embed.weight
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity, weight.dtype, weight.device)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; by default without the embedding tables, as in the scaling-law papers."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.positions is not None and self.positions.learned:
                total -= self.positions.table.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) as in PaLM's appendix B: 6 N + 12 L d T,
        where N counts the weights of every matrix multiply, the output head included."""
        cfg = self.config
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * cfg.n_layers * cfg.d_model * cfg.context_length
