"""A decoder-only (GPT-style) transformer assembled from layers.py. Plain PyTorch, no Lightning."""

import torch
from torch import Tensor, nn

from xlab.models.cache import KVCache
from xlab.models.config import TransformerConfig
from xlab.models.layers import Block, attention_mask, make_norm
from xlab.models.network import Network


class Decoder(Network):
    """Token embedding, positions, a stack of causal blocks and a language-model head."""

    label = "decoder"

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        rotary = self.init_inputs(config)
        self.blocks = nn.ModuleList(Block(config, rotary=rotary) for _ in range(config.n_layers))
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.init_head(config.n_layers)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        padding: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (batch, time, vocab) for token ids (batch, time); position t sees tokens 0..t only.

        For generation: ``positions`` (time,) or (batch, time) default to those after the cached
        ones; ``padding`` (batch, cached + time), True at padding, keeps every query from those
        keys; ``cache`` receives this call's keys and values.
        """
        time = tokens.size(1)
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + time, device=tokens.device)
        mask = attention_mask(time, padding, causal=True, device=tokens.device)
        x = self.embed_tokens(self.embed, tokens, positions)
        for index, block in enumerate(self.blocks):
            layer_cache = cache.layer(index) if cache is not None else None
            x = self.run_block(block, x, mask=mask, is_causal=mask is None, positions=positions, cache=layer_cache)
        if cache is not None:
            cache.advance(time)
        return self.logits(self.final_norm(x))
