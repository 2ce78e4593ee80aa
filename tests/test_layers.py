"""Attention, masks, rotary and sinusoidal positions, MLP and init against references written here.

The attention reference is the textbook computation, softmax(Q K^T / sqrt(d)) V with an
explicit boolean mask, built from the module's own projection weights but not from its
forward pass. Everything runs in float64 so agreement can be tight.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from xlab.models.config import TransformerConfig
from xlab.models.layers import (
    MLP,
    Attention,
    Block,
    PositionEncoding,
    RotaryEmbedding,
    attention_mask,
    make_norm,
    sinusoids,
)

TOL = dict(rtol=1e-9, atol=1e-10)


def make_config(**overrides):
    options = dict(vocab_size=32, context_length=16, n_layers=1, d_model=24, n_heads=4)
    options.update(overrides)
    return TransformerConfig(**options)


def make_attention(config, rotary=None, seed=0):
    """A float64 Attention with non-zero biases (so a mishandled bias shows up)."""
    torch.manual_seed(seed)
    attn = Attention(config, rotary).double().eval()
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0, 0.3 if param.dim() >= 2 else 0.1)
    return attn


def split_kv_weights(attn):
    """Key and value projections inside ``kv_proj``: keys are the first n_kv_heads * head_dim rows."""
    width = attn.n_kv_heads * attn.head_dim
    w_k, w_v = attn.kv_proj.weight.split(width, dim=0)
    bias = attn.kv_proj.bias
    b_k, b_v = (None, None) if bias is None else bias.split(width, dim=0)
    return (w_k, b_k), (w_v, b_v)


def rotate_reference(x, positions, base):
    """Rotary embedding by complex multiplication, pairing feature i with feature i + head_dim/2.

    (x_i + j x_{i+h/2}) * exp(j * pos * base^(-2i/head_dim)), real parts first then imaginary.
    """
    half = x.size(-1) // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.size(-1))
    angles = positions.double()[:, None] * inv_freq[None, :]
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def reference_attention(attn, x, context=None, allowed=None, rotate=None):
    """Explicit multi-head attention.

    ``allowed``: boolean, broadcastable to (batch, heads, query, key), True where a query may see a key.
    ``rotate``: optional function applied to q and k of shape (batch, heads, time, head_dim).
    """
    batch, time, _ = x.shape
    source = x if context is None else context
    n_heads, n_kv, head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    (w_k, b_k), (w_v, b_v) = split_kv_weights(attn)
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, time, n_heads, head_dim).transpose(1, 2)
    k = F.linear(source, w_k, b_k).view(batch, source.size(1), n_kv, head_dim).transpose(1, 2)
    v = F.linear(source, w_v, b_v).view(batch, source.size(1), n_kv, head_dim).transpose(1, 2)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    # Query head h reads key/value head h // (n_heads / n_kv_heads).
    group = n_heads // n_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    y = y.transpose(1, 2).reshape(batch, time, n_heads * head_dim)
    return F.linear(y, attn.out_proj.weight, attn.out_proj.bias)


def causal_allowed(query_len, key_len):
    return torch.ones(query_len, key_len, dtype=torch.bool).tril(key_len - query_len)


# ----------------------------------------------------------------------------------------------
# Attention against the reference


@pytest.mark.parametrize("bias", [True, False])
def test_causal_self_attention_matches_reference(bias):
    attn = make_attention(make_config(bias=bias))
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    expected = reference_attention(attn, x, allowed=causal_allowed(7, 7))
    torch.testing.assert_close(attn(x, is_causal=True), expected, **TOL)


def test_bidirectional_self_attention_matches_reference():
    attn = make_attention(make_config())
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), **TOL)
    # and causal really differs from full attention (the reference is not blind to the mask)
    assert not torch.allclose(attn(x, is_causal=True), attn(x))


def padding(lengths, total, left=False):
    """(batch, total) boolean, True at padding; right padding unless ``left``."""
    index = torch.arange(total)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return index < total - lengths if left else index >= lengths


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_matches_reference(causal):
    """Padded keys get no weight; with causal=True the mask also hides the future.

    Right padding under causal masking and any padding without it leave every query at
    least one visible key, so every row of the output is defined and compared.
    """
    attn = make_attention(make_config())
    pad = padding([7, 4, 1], 7, left=not causal)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    mask = attention_mask(7, pad, causal=causal, device=x.device)
    allowed = ~pad[:, None, None, :]
    if causal:  # a padding query also sees itself, so that no row is empty
        allowed = (allowed & causal_allowed(7, 7)) | torch.eye(7, dtype=torch.bool)
    out = attn(x, mask=mask, is_causal=causal)
    torch.testing.assert_close(out, reference_attention(attn, x, allowed=allowed), **TOL)
    # Changing the padded positions' content must not change the outputs at real positions.
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), 24, dtype=torch.float64)
    out2 = attn(x2, mask=mask, is_causal=causal)
    real = ~pad
    torch.testing.assert_close(out2[real], out[real], **TOL)


def test_mask_without_padding_equals_is_causal():
    attn = make_attention(make_config())
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    mask = attention_mask(5, torch.zeros(2, 5, dtype=torch.bool), causal=True, device=x.device)
    torch.testing.assert_close(attn(x, mask=mask), attn(x, is_causal=True), **TOL)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("masking", ["causal", "padding"])
def test_grouped_query_attention_matches_reference(n_kv_heads, masking):
    config = make_config(n_heads=4, n_kv_heads=n_kv_heads)
    attn = make_attention(config)
    assert attn.kv_proj.out_features == 2 * n_kv_heads * config.head_dim
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    if masking == "causal":
        out = attn(x, is_causal=True)
        allowed = causal_allowed(6, 6)
    else:
        pad = padding([6, 3], 6)
        out = attn(x, mask=attention_mask(6, pad, causal=True, device=x.device))
        allowed = (~pad[:, None, None, :] & causal_allowed(6, 6)) | torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(out, reference_attention(attn, x, allowed=allowed), **TOL)


def test_grouped_query_heads_share_keys_in_consecutive_groups():
    """With 4 query heads over 2 kv heads, heads 0,1 read kv head 0 and heads 2,3 read kv head 1.

    Zeroing the value projection of kv head 1 must silence exactly query heads 2 and 3.
    """
    config = make_config(n_heads=4, n_kv_heads=2, bias=False)
    attn = make_attention(config)
    hd = config.head_dim
    with torch.no_grad():
        attn.kv_proj.weight[2 * hd + hd : 2 * hd + 2 * hd] = 0  # value rows of kv head 1
        attn.out_proj.weight.copy_(torch.eye(24, dtype=torch.float64))  # expose per-head outputs
    y = attn(torch.randn(2, 5, 24, dtype=torch.float64), is_causal=True).view(2, 5, 4, hd)
    assert y[:, :, :2].abs().max() > 1e-3
    assert torch.equal(y[:, :, 2:], torch.zeros_like(y[:, :, 2:]))


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cross_attention_matches_reference(with_padding, n_kv_heads):
    attn = make_attention(make_config(n_kv_heads=n_kv_heads))
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    context = torch.randn(3, 9, 24, dtype=torch.float64)
    if with_padding:
        pad = padding([9, 6, 2], 9)
        mask = attention_mask(5, pad, causal=False, device=x.device)
        allowed = ~pad[:, None, None, :]
    else:
        mask = allowed = None
    out = attn(x, context=context, mask=mask)
    assert out.shape == (3, 5, 24)
    torch.testing.assert_close(out, reference_attention(attn, x, context=context, allowed=allowed), **TOL)


def test_cross_attention_ignores_rotary():
    """Rotary positions belong to self-attention only; queries and memory are different sequences."""
    config = make_config(positions="rotary")
    plain = make_attention(config, seed=1)
    rotated = make_attention(config, rotary=RotaryEmbedding(config).double(), seed=1)
    x = torch.randn(2, 4, 24, dtype=torch.float64)
    context = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(rotated(x, context=context), plain(x, context=context), **TOL)


# ----------------------------------------------------------------------------------------------
# Rotary positions


def test_rotary_matches_complex_rotation():
    config = make_config(d_model=32, n_heads=2, positions="rotary", rope_base=500.0)
    rotary = RotaryEmbedding(config).double()
    x = torch.randn(2, 3, 10, config.head_dim, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 3, 5, 8, 13, 15, 9, 4])
    # The module's angle table is built in float32, hence 1e-5 rather than float64 tolerance.
    torch.testing.assert_close(rotary(x, positions), rotate_reference(x, positions, 500.0), rtol=1e-5, atol=1e-5)
    # Position 0 is the identity.
    torch.testing.assert_close(rotary(x, torch.zeros(10, dtype=torch.long)), x)


def test_rotary_dot_product_depends_only_on_relative_position():
    config = make_config(d_model=32, n_heads=2, context_length=64, positions="rotary")
    rotary = RotaryEmbedding(config).double()
    q = torch.randn(1, 1, 1, config.head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, config.head_dim, dtype=torch.float64)

    def score(m, n):
        return (rotary(q, torch.tensor([m])) * rotary(k, torch.tensor([n]))).sum().item()

    for m, n in [(3, 1), (10, 2), (7, 7), (0, 5)]:
        for shift in (1, 9, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-5, abs=1e-5)
    # ...and it does depend on the relative position (the rotation is not the identity).
    assert abs(score(5, 0) - score(0, 0)) > 1e-3
    # A rotation preserves length.
    rotated = rotary(q, torch.tensor([17]))
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


def test_rotary_attention_matches_reference():
    config = make_config(positions="rotary", n_kv_heads=2)
    attn = make_attention(config, rotary=RotaryEmbedding(config).double())
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    positions = torch.arange(6)
    expected = reference_attention(
        attn, x, allowed=causal_allowed(6, 6), rotate=lambda t: rotate_reference(t, positions, config.rope_base)
    )
    torch.testing.assert_close(attn(x, is_causal=True), expected, rtol=1e-5, atol=1e-5)
    # Explicit positions equal to the default change nothing; shifted positions change only rounding,
    # because self-attention scores depend on relative positions alone.
    torch.testing.assert_close(attn(x, is_causal=True, positions=positions), attn(x, is_causal=True), **TOL)
    torch.testing.assert_close(
        attn(x, is_causal=True, positions=positions + 7), attn(x, is_causal=True), rtol=1e-5, atol=1e-5
    )
    # Without rotation the output is different (the rotation is applied at all).
    plain = make_attention(config)
    plain.load_state_dict(attn.state_dict())
    assert not torch.allclose(plain(x, is_causal=True), attn(x, is_causal=True), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# attention_mask


def test_attention_mask_none_without_padding():
    assert attention_mask(4, None, causal=True, device=torch.device("cpu")) is None
    assert attention_mask(4, None, causal=False, device=torch.device("cpu")) is None


def test_attention_mask_causal_with_padding_values():
    pad = torch.tensor([[False, False, False, True], [True, False, False, False]])
    mask = attention_mask(4, pad, causal=True, device=torch.device("cpu"))
    assert mask.dtype == torch.bool
    assert mask.shape == (2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                # A padding query may see itself, so that no row is empty (an empty row gives NaN).
                assert mask[b, 0, i, j].item() == ((j <= i and not pad[b, j].item()) or i == j), (b, i, j)


def test_attention_mask_padding_only_broadcasts_over_queries():
    pad = torch.tensor([[False, False, True], [False, True, True]])
    mask = attention_mask(5, pad, causal=False, device=torch.device("cpu"))
    assert mask.dtype == torch.bool
    assert mask.dim() == 4 and mask.size(0) == 2 and mask.size(1) == 1 and mask.size(-1) == 3
    full = mask.expand(2, 1, 5, 3)
    torch.testing.assert_close(full, (~pad)[:, None, None, :].expand(2, 1, 5, 3))


def test_attention_mask_fewer_queries_than_keys_aligns_queries_with_the_last_keys():
    """With 2 queries over 4 keys (e.g. new tokens after a cache), query i sits at key position 2 + i."""
    pad = torch.zeros(1, 4, dtype=torch.bool)
    mask = attention_mask(2, pad, causal=True, device=torch.device("cpu"))
    assert mask.shape == (1, 1, 2, 4)
    expected = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert torch.equal(mask[0, 0], expected)
    pad = torch.tensor([[True, False, False, False, False]])
    mask = attention_mask(3, pad, causal=True, device=torch.device("cpu"))
    expected = torch.tensor(
        [[False, True, True, False, False], [False, True, True, True, False], [False, True, True, True, True]]
    )
    assert torch.equal(mask[0, 0], expected)


def test_attention_with_fewer_queries_than_keys_matches_reference():
    """The last 2 queries of a sequence against all 6 keys: same as rows 4, 5 of the full causal pass."""
    attn = make_attention(make_config(), seed=3)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    full = attn(x, is_causal=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    mask = attention_mask(2, pad, causal=True, device=x.device)
    # Cross-attention from the last two positions to the whole sequence reproduces causal self-attention.
    tail = attn(x[:, 4:], context=x, mask=mask)
    torch.testing.assert_close(tail, full[:, 4:], **TOL)


# ----------------------------------------------------------------------------------------------
# Positions, MLP, norms


@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoids_match_formula(dim):
    table = sinusoids(12, dim)
    assert table.shape == (12, dim)
    for pos in range(12):
        for feature in range(dim):
            i = feature // 2
            angle = pos / 10000 ** (2 * i / dim)
            expected = math.sin(angle) if feature % 2 == 0 else math.cos(angle)
            assert table[pos, feature].item() == pytest.approx(expected, abs=1e-5), (pos, feature)


def test_sinusoidal_position_encoding_is_the_fixed_table():
    config = make_config(positions="sinusoidal", d_model=16, context_length=10)
    encoding = PositionEncoding(config)
    assert list(encoding.parameters()) == []
    positions = torch.tensor([0, 3, 9])
    torch.testing.assert_close(encoding(positions), sinusoids(10, 16)[positions])


def test_learned_position_encoding_is_a_table_of_max_positions():
    config = make_config(positions="learned", d_model=16, context_length=10, max_positions=20)
    encoding = PositionEncoding(config)
    assert encoding.table.weight.shape == (20, 16)
    torch.testing.assert_close(encoding(torch.tensor([19, 2])), encoding.table.weight[[19, 2]])


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_mlp_matches_reference(activation):
    config = make_config(d_model=8, n_heads=2, d_ff=12, activation=activation)
    torch.manual_seed(0)
    mlp = MLP(config).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    h = F.linear(x, mlp.in_proj.weight, mlp.in_proj.bias)
    if activation == "swiglu":
        assert mlp.in_proj.out_features == 24
        h = F.silu(h[..., :12]) * h[..., 12:]
    else:
        assert mlp.in_proj.out_features == 12
        h = torch.relu(h) if activation == "relu" else F.gelu(h)
    expected = F.linear(h, mlp.out_proj.weight, mlp.out_proj.bias)
    torch.testing.assert_close(mlp(x), expected, **TOL)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_matches_formula(norm):
    config = make_config(d_model=8, n_heads=2, norm=norm, norm_eps=1e-5)
    layer = make_norm(config).double()
    x = torch.randn(4, 8, dtype=torch.float64) * 3 + 1
    if norm == "layernorm":
        expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    else:
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), expected, **TOL)


# ----------------------------------------------------------------------------------------------
# Block wiring


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("cross", [False, True])
def test_block_residual_wiring(placement, cross):
    """pre: x + f(norm(x)) per branch; post: norm(x + f(x)). Self-attn, then cross-attn, then MLP."""
    config = make_config(norm_placement=placement)
    torch.manual_seed(0)
    block = Block(config, cross_attention=cross).double().eval()
    with torch.no_grad():
        for norm in block.norms:  # non-trivial gains so a skipped or misplaced norm shows
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    assert len(block.norms) == (3 if cross else 2)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    context = torch.randn(2, 7, 24, dtype=torch.float64) if cross else None
    context_mask = attention_mask(5, padding([7, 3], 7), causal=False, device=x.device) if cross else None
    branches = [lambda h: block.self_attn(h, is_causal=True)]
    if cross:
        branches.append(lambda h: block.cross_attn(h, context=context, mask=context_mask))
    branches.append(block.mlp)
    expected = x
    for norm, branch in zip(block.norms, branches):
        expected = expected + branch(norm(expected)) if placement == "pre" else norm(expected + branch(expected))
    out = block(x, is_causal=True, context=context, context_mask=context_mask)
    torch.testing.assert_close(out, expected, **TOL)
