"""The building blocks of every XLab transformer: the one home of attention, MLP, norms and positions.

Blocks serve decoder-only models (causal self-attention) as well as encoder-decoders
(bidirectional self-attention, cross-attention), so each model family is an assembly
of these pieces rather than a copy of them.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlab.models.cache import LayerCache
from xlab.models.config import TransformerConfig


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def relu_squared(x: Tensor) -> Tensor:
    """ReLU squared (Primer; the NanoGPT speedrun's MLP activation)."""
    return F.relu(x).square()


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "relu2": relu_squared}


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)``: logits squashed smoothly into (-cap, cap); unchanged when ``cap`` is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


class MLP(nn.Module):
    """Position-wise feed-forward network: GELU, ReLU or ReLU squared, or the gated SwiGLU variant."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.activation == "swiglu"
        hidden = 2 * config.d_ff if self.gated else config.d_ff
        self.in_proj = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.out_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.act = ACTIVATIONS.get(config.activation, F.gelu)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_proj(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return self.out_proj(self.dropout(h))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), in the rotate-half layout Llama uses."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        inv_freq = 1.0 / config.rope_base ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        angles = torch.outer(torch.arange(config.max_positions).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` (batch, heads, time, head_dim) by the angles of ``positions``, (time,) or (batch, time)."""
        cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads, through F.scaled_dot_product_attention.

    Self-attention when ``context`` is None, cross-attention to ``context`` otherwise. With a
    ``cache``, self-attention appends its new keys and values to it and attends to all of them;
    cross-attention computes the context's keys and values once and reuses them. With
    ``qk_norm``, queries and keys are RMS-normalised per head (before rotary positions, so the
    cache holds normalised keys).
    """

    def __init__(self, config: TransformerConfig, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=config.bias)
        self.kv_proj = nn.Linear(config.d_model, 2 * self.n_kv_heads * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.rotary = rotary
        self.q_norm, self.k_norm = (head_norm(config), head_norm(config)) if config.qk_norm else (None, None)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        positions: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """``mask``: boolean, True where a query may attend a key, broadcastable to (batch, heads, q, k).

        ``is_causal`` with more keys than queries (a cache) aligns the queries with the last keys.
        """
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if context is not None:
            compute = partial(self._keys_values, context)
            k, v = compute() if cache is None else cache.cross_attention(compute)
        else:
            k, v = self._keys_values(x)
            if self.rotary is not None:
                positions = torch.arange(time, device=x.device) if positions is None else positions
                q, k = self.rotary(q, positions), self.rotary(k, positions)
            if cache is not None:
                k, v = cache.append(k, v)
        if is_causal and mask is None and k.size(2) != time:
            is_causal = False
            if time > 1:
                mask = torch.ones(time, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - time)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, -1))

    def _keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (batch, kv_heads, time, head_dim) of ``source`` (batch, time, d_model)."""
        kv = self.kv_proj(source).view(source.size(0), source.size(1), 2, self.n_kv_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return (k if self.k_norm is None else self.k_norm(k)), v


def head_norm(config: TransformerConfig) -> nn.RMSNorm:
    """QK-norm: RMSNorm over one head's features, its gain shared by the heads."""
    return nn.RMSNorm(config.head_dim, eps=config.norm_eps)


def attention_mask(query_len: int, key_padding: Tensor | None, causal: bool, device: torch.device) -> Tensor | None:
    """A boolean (batch or 1, 1, query, key) mask, or None when a plain causal or full attention will do.

    ``key_padding`` is (batch, key) and True at padding positions; queries are the last
    ``query_len`` keys. Causally, a padding query still sees itself: a row with nothing to
    attend would make NaNs that later layers read as keys.
    """
    if key_padding is None:
        return None
    mask = ~key_padding[:, None, None, :]
    if causal:
        key_len = key_padding.size(1)
        seen = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(key_len - query_len)
        itself = seen & ~seen.tril(key_len - query_len - 1)
        mask = (mask & seen) | itself
    return mask


class Block(nn.Module):
    """Self-attention, optional cross-attention, then MLP, each a residual branch with pre- or post-norm."""

    def __init__(self, config: TransformerConfig, cross_attention: bool = False, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.self_attn = Attention(config, rotary)
        self.cross_attn = Attention(config) if cross_attention else None
        self.mlp = MLP(config)
        self.norms = nn.ModuleList(make_norm(config) for _ in range(3 if cross_attention else 2))
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        positions: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        norms = iter(self.norms)
        x = self._residual(
            x,
            next(norms),
            lambda h: self.self_attn(h, mask=mask, is_causal=is_causal, positions=positions, cache=cache),
        )
        if self.cross_attn is not None:
            x = self._residual(
                x, next(norms), lambda h: self.cross_attn(h, context=context, mask=context_mask, cache=cache)
            )
        return self._residual(x, next(norms), self.mlp)

    def _residual(self, x: Tensor, norm: nn.Module, branch) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(branch(norm(x)))
        return norm(x + self.dropout(branch(x)))


class PositionEncoding(nn.Module):
    """Learned or sinusoidal absolute positions added to the token embeddings."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.learned = config.positions == "learned"
        if self.learned:
            self.table = nn.Embedding(config.max_positions, config.d_model)
        else:
            self.register_buffer("table_", sinusoids(config.max_positions, config.d_model), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table(positions) if self.learned else self.table_[positions]


def sinusoids(length: int, dim: int) -> Tensor:
    """The fixed sine/cosine table of "Attention Is All You Need": sin on even, cos on odd features."""
    position = torch.arange(length).float()[:, None]
    freq = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table
