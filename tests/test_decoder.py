"""The decoder-only transformer and its config: causality, tying, init, capacity, validation, FLOPs."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from xlab.errors import UserError
from xlab.models.config import TransformerConfig, default_d_ff
from xlab.models.decoder import Decoder
from xlab.models.layers import sinusoids


def tiny_config(**overrides):
    options = dict(vocab_size=37, context_length=10, n_layers=2, d_model=16, n_heads=2, d_ff=32)
    options.update(overrides)
    return TransformerConfig(**options)


# ----------------------------------------------------------------------------------------------
# Causality


VARIANTS = list(
    itertools.product(
        ["learned", "sinusoidal", "rotary"], ["pre", "post"], ["gelu", "relu", "swiglu"], ["layernorm", "rmsnorm"]
    )
)


@pytest.mark.parametrize("positions,placement,activation,norm", VARIANTS)
def test_decoder_is_causal(positions, placement, activation, norm):
    """Changing the token at position t leaves logits before t unchanged and changes those at t."""
    torch.manual_seed(0)
    config = tiny_config(positions=positions, norm_placement=placement, activation=activation, norm=norm, d_ff=None)
    model = Decoder(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, config.context_length))
    with torch.no_grad():
        logits = model(tokens)
        assert logits.shape == (2, config.context_length, config.vocab_size)
        for t in (0, 3, config.context_length - 1):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % config.vocab_size
            new = model(changed)
            torch.testing.assert_close(new[:, :t], logits[:, :t], rtol=0, atol=1e-6)
            assert (new[:, t] - logits[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
def test_decoder_sees_token_order(positions):
    """Swapping two earlier tokens changes the last prediction of a one-layer decoder.

    With one layer and no positions, the last query attends to a set of keys, so the swap
    would change nothing; a difference is the position signal. Float64 so that the small
    differences of an untrained model stand far above rounding.
    """
    torch.manual_seed(0)
    model = Decoder(tiny_config(positions=positions, n_layers=1)).double().eval()
    tokens = torch.randint(0, 37, (1, 6))
    tokens[0, 1], tokens[0, 2] = 5, 9
    swapped = tokens.clone()
    swapped[0, 1], swapped[0, 2] = 9, 5
    with torch.no_grad():
        assert (model(tokens)[0, -1] - model(swapped)[0, -1]).abs().max() > 1e-10
        if positions == "learned":  # control: without the position signal the swap is invisible
            model.positions.table.weight.zero_()
            assert (model(tokens)[0, -1] - model(swapped)[0, -1]).abs().max() < 1e-13


def test_shorter_sequences_give_the_same_prefix_logits():
    torch.manual_seed(0)
    model = Decoder(tiny_config(positions="rotary")).eval()
    tokens = torch.randint(0, 37, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :4]), model(tokens)[:, :4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("placement,norm", [("pre", "layernorm"), ("pre", "rmsnorm"), ("post", "layernorm")])
def test_decoder_assembly(positions, placement, norm):
    """Embedding (+ absolute positions), causal blocks, a final norm only with pre-norm, then the head."""
    torch.manual_seed(0)
    config = tiny_config(positions=positions, norm_placement=placement, norm=norm, tie_embeddings=False)
    model = Decoder(config).double().eval()
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    positions_ = torch.arange(7)
    x = model.embed.weight[tokens]
    if positions == "sinusoidal":  # the original Transformer's sqrt(d_model) embedding scale
        x = x * config.d_model**0.5
    if positions == "learned":
        x = x + model.positions.table.weight[positions_]
    elif positions == "sinusoidal":
        x = x + sinusoids(config.max_positions, config.d_model).double()[positions_]
    else:
        assert model.positions is None  # rotary acts inside attention only
    for block in model.blocks:
        x = block(x, is_causal=True, positions=positions_)
    if placement == "pre":
        expected_norm = torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm
        assert isinstance(model.final_norm, expected_norm)
        x = model.final_norm(x)
    else:
        assert isinstance(model.final_norm, torch.nn.Identity)  # each post-norm block already ends in a norm
    expected = x @ model.head.weight.T
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Weight tying and initialisation


def test_tied_head_shares_the_embedding_tensor():
    model = Decoder(tiny_config(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    # One tensor, counted once, updated once.
    params = list(model.parameters())
    assert sum(p is model.embed.weight for p in params) == 1
    with torch.no_grad():
        model.embed.weight[3].fill_(1.5)
    assert torch.equal(model.head.weight[3], torch.full((16,), 1.5))
    # Gradients from the embedding lookup and the head land in the same tensor.
    tokens = torch.randint(0, 37, (2, 5))
    model(tokens).sum().backward()
    assert model.head.weight.grad is model.embed.weight.grad


def test_untied_head_is_a_separate_tensor():
    tied = Decoder(tiny_config(tie_embeddings=True))
    untied = Decoder(tiny_config(tie_embeddings=False))
    assert untied.head.weight is not untied.embed.weight
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    with torch.no_grad():
        untied.embed.weight.zero_()
    assert untied.head.weight.abs().sum() > 0
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 37 * 16


def test_gpt2_init_statistics():
    """N(0, 0.02) matrices, residual out_proj N(0, 0.02/sqrt(2L)), zero biases, unit norm gains.

    d_model 256 gives 65k+ samples per matrix, so the sample std is within ~1% of the truth.
    """
    torch.manual_seed(1234)
    n_layers = 4
    config = TransformerConfig(
        vocab_size=2000,
        context_length=256,
        n_layers=n_layers,
        d_model=256,
        n_heads=4,
        n_kv_heads=2,
        tie_embeddings=False,
        positions="learned",
    )
    model = Decoder(config)
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    seen_residual, seen_other = 0, 0
    for name, param in model.named_parameters():
        values = param.detach().flatten()
        if name.endswith("out_proj.weight"):
            seen_residual += 1
            assert values.std().item() == pytest.approx(residual_std, rel=0.03), name
            assert abs(values.mean().item()) < 4 * residual_std / math.sqrt(values.numel()), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(values) == 0, name
        elif "norm" in name:
            assert torch.equal(values, torch.ones_like(values)), name
        else:
            assert param.dim() >= 2, name
            seen_other += 1
            assert values.std().item() == pytest.approx(0.02, rel=0.03), name
            assert abs(values.mean().item()) < 4 * 0.02 / math.sqrt(values.numel()), name
            # Normal, not uniform with the same std: ~68.3% of the mass within one std.
            within = (values.abs() < 0.02).float().mean().item()
            assert within == pytest.approx(0.6827, abs=0.01), name
    # attention out_proj and MLP out_proj in each layer
    assert seen_residual == 2 * n_layers
    # embed, position table, head, and q/kv/mlp-in per layer
    assert seen_other == 3 + 3 * n_layers


def test_init_with_tied_embeddings_keeps_0_02_std():
    torch.manual_seed(0)
    model = Decoder(TransformerConfig(vocab_size=4000, context_length=8, n_layers=1, d_model=128, n_heads=2))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.03)


# ----------------------------------------------------------------------------------------------
# Capacity: memorise one batch


def test_overfits_one_batch():
    """A tiny decoder must drive next-token cross-entropy on one fixed batch to ~0.

    Every (prefix -> next token) pair is learnable because the first tokens of the four
    sequences differ, so no two sequences share a prefix with different continuations.
    """
    torch.manual_seed(0)
    config = tiny_config(vocab_size=32, context_length=16, n_layers=2, d_model=32, n_heads=4, d_ff=64)
    model = Decoder(config)
    tokens = torch.randint(0, 32, (4, 17))
    tokens[:, 0] = torch.tensor([1, 7, 19, 30])
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    initial = F.cross_entropy(model(inputs).reshape(-1, 32), targets.reshape(-1)).item()
    assert initial == pytest.approx(math.log(32), rel=0.1)  # small init: near-uniform predictions
    for _ in range(300):
        loss = F.cross_entropy(model(inputs).reshape(-1, 32), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


# ----------------------------------------------------------------------------------------------
# Config: validation and defaults


@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(d_model=30, n_heads=4), ["d_model", "n_heads"]),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), ["n_heads", "n_kv_heads"]),
        (dict(context_length=64, max_positions=32), ["context_length", "max_positions"]),
        (dict(d_model=12, n_heads=4, positions="rotary"), ["rotary", "d_model", "n_heads"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(dropout=-0.1), ["dropout"]),
        (dict(n_layers=0), ["n_layers"]),
    ],
)
def test_config_validation_names_the_setting(overrides, words):
    options = dict(vocab_size=10, context_length=8)
    options.update(overrides)
    with pytest.raises(UserError) as excinfo:
        TransformerConfig(**options)
    for word in words:
        assert word in str(excinfo.value)


def test_config_accepts_valid_edge_cases():
    # odd head_dim is fine without rotary; n_kv_heads == 1 is multi-query attention
    TransformerConfig(vocab_size=10, context_length=8, d_model=12, n_heads=4, positions="learned")
    TransformerConfig(vocab_size=10, context_length=8, d_model=32, n_heads=4, n_kv_heads=1)
    TransformerConfig(vocab_size=10, context_length=8, max_positions=8)


def test_config_defaults():
    gelu = TransformerConfig(vocab_size=10, context_length=8, d_model=256, activation="gelu")
    assert gelu.d_ff == 1024
    swiglu = TransformerConfig(vocab_size=10, context_length=8, d_model=256, activation="swiglu")
    assert swiglu.d_ff == 704  # 8 * 256 / 3 = 682.67, rounded up to a multiple of 64
    assert TransformerConfig(vocab_size=10, context_length=8, d_model=100, n_heads=4).d_ff == 448  # 400 -> 448
    config = TransformerConfig(vocab_size=10, context_length=24, n_heads=8, d_model=64)
    assert config.n_kv_heads == 8
    assert config.max_positions == 24
    assert config.head_dim == 8
    explicit = TransformerConfig(vocab_size=10, context_length=24, max_positions=100, d_ff=77, n_kv_heads=2, n_heads=4)
    assert (explicit.max_positions, explicit.d_ff, explicit.n_kv_heads) == (100, 77, 2)


@pytest.mark.parametrize("d_model", [64, 96, 100, 256, 768])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_default_d_ff_rule(d_model, activation):
    value = default_d_ff(d_model, activation)
    target = 8 * d_model / 3 if activation == "swiglu" else 4 * d_model
    assert value % 64 == 0
    assert target <= value < target + 64


# ----------------------------------------------------------------------------------------------
# Model size


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_hand_count(activation, tie):
    """PaLM's 6 N + 12 L d T, where N counts matmul weights (head included, embedding lookup not)."""
    config = TransformerConfig(
        vocab_size=10,
        context_length=8,
        n_layers=2,
        d_model=8,
        n_heads=2,
        n_kv_heads=1,
        d_ff=16,
        activation=activation,
        tie_embeddings=tie,
    )
    model = Decoder(config)
    head_dim = 4
    q = 8 * 8
    kv = 8 * 2 * 1 * head_dim  # keys and values for one kv head
    out = 8 * 8
    mlp_in = 8 * (32 if activation == "swiglu" else 16)  # SwiGLU has gate and up halves
    mlp_out = 16 * 8
    per_layer = q + kv + out + mlp_in + mlp_out
    head = 10 * 8
    n = 2 * per_layer + head
    assert n == (976 if activation == "gelu" else 1232)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 8 * 8


def test_num_parameters_excludes_embeddings():
    config = tiny_config(tie_embeddings=False, positions="learned")
    model = Decoder(config)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=False) == total
    embeddings = 37 * 16 + 10 * 16  # token table and learned position table
    assert model.num_parameters() == total - embeddings
