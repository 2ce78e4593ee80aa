"""The NanoGPT-speedrun architecture switches: each does what it claims, on both families, and the KV cache,
beam search and the torch reference keep working with all of them on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import WORDS
from tests.test_generation import full_logits
from tests.test_hf import random_model, write_export
from xlab.checkpoint import load_model
from xlab.data.tokenizer import EOS_ID, train_tokenizer
from xlab.errors import UserError
from xlab.generation import GenerationConfig, beam_search, decode_sources
from xlab.generation.engine import Rows
from xlab.hf import export_hf
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder
from xlab.models.layers import MLP, relu_squared
from xlab.models.network import residual_projections

VOCAB = 40
ALL_SWITCHES = {"qk_norm": True, "activation": "relu2", "logit_softcap": 3.0, "zero_init_projections": True}


def arch(**options) -> TransformerConfig:
    settings = {"vocab_size": VOCAB, "context_length": 16, "n_layers": 2, "d_model": 32, "n_heads": 4}
    return TransformerConfig(**{**settings, **options})


def scrambled(model: nn.Module, seed: int = 0, std: float = 0.5) -> nn.Module:
    """``model`` with every weight drawn far from its initialisation (zero projections and unit gains included),
    so that a switch that does nothing cannot pass for one that does."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model.eval()


def tokens(batch: int = 2, time: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, time), generator=torch.Generator().manual_seed(seed))


class AttentionInputs:
    """Records the queries and keys every F.scaled_dot_product_attention call receives."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.queries: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        original = F.scaled_dot_product_attention

        def record(q, k, v, *args, **kwargs):
            self.queries.append(q.detach())
            self.keys.append(k.detach())
            return original(q, k, v, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", record)


def rms_per_head(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, time, head_dim) -> the root mean square of each head's vector at each position."""
    return x.pow(2).mean(-1).sqrt()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_gives_every_query_and_key_head_unit_rms(monkeypatch: pytest.MonkeyPatch, positions, qk_norm):
    """Self- and cross-attention alike; the norms' gains are their initial ones, the projections scrambled.
    Without qk_norm the same check fails, so it is the switch that normalises."""
    model = EncoderDecoder(arch(qk_norm=qk_norm, positions=positions))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.5)
    seen = AttentionInputs(monkeypatch)
    with torch.no_grad():
        model.eval()(tokens(), tokens(seed=2))
    assert len(seen.queries) == 3 * 2  # encoder self, decoder self and cross, two layers
    for x in seen.queries + seen.keys:
        unit = torch.allclose(rms_per_head(x), torch.ones(()), atol=1e-3)
        assert unit is qk_norm


def test_qk_norm_has_a_learned_gain_per_head_feature():
    attention = Decoder(arch(qk_norm=True)).blocks[0].self_attn
    assert attention.q_norm.weight.shape == attention.k_norm.weight.shape == (8,)
    assert Decoder(arch()).blocks[0].self_attn.q_norm is None


@pytest.mark.parametrize("network", [Decoder, EncoderDecoder])
def test_soft_capped_logits_are_cap_tanh_of_the_uncapped_ones_and_stay_within_the_cap(network):
    capped = scrambled(network(arch(logit_softcap=1.5)))
    plain = network(arch()).eval()
    plain.load_state_dict(capped.state_dict())  # the cap has no weights: the same network without it
    inputs = (tokens(),) if network is Decoder else (tokens(), tokens(seed=2))
    with torch.no_grad():
        raw, logits = plain(*inputs), capped(*inputs)
    assert raw.abs().max() > 4  # far past the cap, so the cap matters
    assert logits.abs().max() < 1.5
    torch.testing.assert_close(logits, 1.5 * torch.tanh(raw / 1.5))


def test_relu2_is_relu_squared_in_the_mlp():
    x = torch.linspace(-3, 3, 61)
    assert torch.equal(relu_squared(x), torch.where(x > 0, x * x, torch.zeros(())))
    mlp = scrambled(MLP(arch(activation="relu2")))
    h = torch.randn(4, 32)
    with torch.no_grad():
        expected = mlp.out_proj(torch.relu(mlp.in_proj(h)) ** 2)
        torch.testing.assert_close(mlp(h), expected)
    assert arch(activation="relu2").d_ff == 128  # 4x width, as for GELU


@pytest.mark.parametrize("network", [Decoder, EncoderDecoder, TorchEncoderDecoder])
def test_zero_init_projections_start_at_zero_and_the_blocks_as_the_identity(network):
    model = network(arch(zero_init_projections=True))
    projections = residual_projections(model)
    assert len(projections) == (2 if network is Decoder else 5) * 2
    assert all(torch.count_nonzero(p.weight) == 0 for p in projections)
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and all(m is not p for p in projections)]
    assert all(torch.count_nonzero(m.weight) > 0 for m in others)
    if network is Decoder:
        model.eval()
        ids = tokens()
        positions = torch.arange(ids.size(1))
        with torch.no_grad():
            embedded = model.embed(ids) + model.positions(positions)
            torch.testing.assert_close(model(ids), model.head(model.final_norm(embedded)))


def test_default_projections_are_small_but_not_zero():
    assert all(torch.count_nonzero(p.weight) > 0 for p in residual_projections(Decoder(arch())))


def test_the_torch_reference_honours_the_cap_and_zero_init_and_refuses_qk_norm_by_name():
    config = arch(norm_placement="post", activation="relu", logit_softcap=2.0, zero_init_projections=True)
    ours = scrambled(EncoderDecoder(config))
    reference = TorchEncoderDecoder.from_xlab(ours).eval()
    source, target = tokens(), tokens(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reference(source, target), ours(source, target), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match=r"torch implementation .* has no QK-norm \(qk_norm\): use implementation xlab"):
        TorchEncoderDecoder(arch(qk_norm=True))
    with pytest.raises(UserError, match="has no activation relu2"):
        TorchEncoderDecoder(arch(activation="relu2"))


def test_bad_softcap_is_a_user_error():
    with pytest.raises(UserError, match="logit_softcap must be positive"):
        arch(logit_softcap=0.0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_steps_equal_uncached_with_every_switch(positions):
    model = scrambled(Decoder(arch(positions=positions, context_length=24, **ALL_SWITCHES)), std=0.3)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    appended = tokens(batch=2, time=4, seed=3)
    with torch.no_grad():
        rows = Rows(model, prompts, 5 + 4)
        incremental = [rows.prefill()] + [rows.step(appended[:, step]) for step in range(4)]
    for row, prompt in enumerate(prompts):
        reference = full_logits(model, prompt + appended[row].tolist())
        for step, logits in enumerate(incremental):
            torch.testing.assert_close(logits[row], reference[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4)


def test_beam_search_with_every_switch_returns_its_scored_best_first():
    model = scrambled(Decoder(arch(context_length=24, **ALL_SWITCHES)), std=0.3)
    config = GenerationConfig(max_new_tokens=5, num_beams=3, num_return_sequences=3)
    for prompt, returned in zip([[5, 6, 7], [8]], beam_search(model, [[5, 6, 7], [8]], config)):
        scores = [score for _, score in returned]
        assert scores == sorted(scores, reverse=True) and len(returned) == 3
        for ids, score in returned:
            log_probs = full_logits(model, prompt + ids).log_softmax(-1)
            total = sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(ids))
            assert score == pytest.approx(total / len(ids), abs=1e-4)


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2}])
def test_translator_cached_and_uncached_decoding_agree_with_every_switch(options: dict):
    model = scrambled(EncoderDecoder(arch(positions="rotary", **ALL_SWITCHES)), std=0.3)
    sources = [[5, 6, 7, EOS_ID], [8, 9, 10, 11, EOS_ID]]
    settings = GenerationConfig(max_new_tokens=8, **options)
    cached = decode_sources(model, sources, settings)
    uncached = decode_sources(model, sources, settings, cached=False)
    assert [[ids for ids, _ in rows] for rows in cached] == [[ids for ids, _ in rows] for rows in uncached]
    for rows, reference in zip(cached, uncached):
        assert [score for _, score in rows] == pytest.approx([score for _, score in reference], abs=1e-4)


def test_xlab_export_round_trip_keeps_every_switch_and_hugging_face_refuses_them_by_name(tmp_path):
    loaded = random_model(train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300), **ALL_SWITCHES)
    write_export(loaded, tmp_path / "model.safetensors")
    restored, _ = load_model(tmp_path / "model.safetensors")
    assert {key: getattr(restored.config, key) for key in ALL_SWITCHES} == ALL_SWITCHES
    ids = tokens(batch=3, time=16)
    with torch.no_grad():
        assert torch.equal(restored(ids), loaded.model(ids))
    with pytest.raises(UserError, match="qk_norm=true .*logit_softcap=3.0"):
        export_hf(tmp_path / "model.safetensors", tmp_path / "hf")
