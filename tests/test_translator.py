"""The encoder-decoder against torch.nn.Transformer, its masks, causality, loss, scores and cached decoding."""

import math
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from torch import nn

from xlab.callbacks import EngineDecoding
from xlab.data.tokenizer import EOS_ID, PAD_ID
from xlab.errors import UserError
from xlab.generation import GenerationConfig, decode_sources
from xlab.loop import count_batch
from xlab.models.config import TransformerConfig
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder, copy_stacks_to_torch
from xlab.models.metrics import corpus_scores
from xlab.models.translator import Translator

VOCAB = 40


def config(**options) -> TransformerConfig:
    settings = {"vocab_size": VOCAB, "context_length": 16, "n_layers": 2, "d_model": 32, "n_heads": 4}
    return TransformerConfig(**{**settings, **options})


def original(**options) -> TransformerConfig:
    """The configuration of "Attention Is All You Need": post-norm, ReLU, sinusoidal positions."""
    return config(norm_placement="post", activation="relu", positions="sinusoidal", tie_embeddings=False, **options)


def padded_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=generator)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return tokens.masked_fill(padding, PAD_ID), padding


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_stacks_equal_torch_transformer_with_copied_weights_and_padding(norm_placement: str):
    torch.manual_seed(0)
    cfg = original() if norm_placement == "post" else config(norm_placement="pre", activation="relu")
    model = EncoderDecoder(cfg).eval()
    reference = nn.Transformer(
        cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_layers, cfg.d_ff, dropout=0.0, batch_first=True,
        norm_first=norm_placement == "pre",
    ).eval()  # fmt: skip
    if norm_placement == "post":  # the paper's post-norm stacks end without the extra LayerNorm torch adds
        reference.encoder.norm = reference.decoder.norm = None
    copy_stacks_to_torch(model, reference)
    source, source_padding = padded_batch([7, 4, 2], seed=1)
    target, target_padding = padded_batch([5, 6, 3], seed=2)

    ours = model(source, target, source_padding, target_padding)
    embedded_source = model.embed_tokens(model.source_embed, source, torch.arange(source.size(1)))
    embedded_target = model.embed_tokens(model.embed, target, torch.arange(target.size(1)))
    causal = torch.ones(target.size(1), target.size(1), dtype=torch.bool).triu(1)  # True: may not attend
    hidden = reference(
        embedded_source, embedded_target, tgt_mask=causal, src_key_padding_mask=source_padding,
        memory_key_padding_mask=source_padding, tgt_key_padding_mask=target_padding, tgt_is_causal=True,
    )  # fmt: skip
    theirs = model.head(hidden)
    real = ~target_padding
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-4)


def test_torch_implementation_matches_the_from_scratch_model_with_copied_weights():
    torch.manual_seed(0)
    ours = EncoderDecoder(original()).eval()
    wrapped = TorchEncoderDecoder.from_xlab(ours).eval()
    source, source_padding = padded_batch([6, 3], seed=3)
    target, _ = padded_batch([4, 4], seed=4)
    torch.testing.assert_close(ours(source, target, source_padding), wrapped(source, target, source_padding))
    sources = [row[~pad].tolist() + [EOS_ID] for row, pad in zip(source, source_padding)]
    greedy = GenerationConfig(max_new_tokens=8)
    (first, second), (torch_first, torch_second) = (
        decode_sources(ours, sources, greedy),
        decode_sources(wrapped, sources, greedy),
    )
    assert first[0][0] == torch_first[0][0] and second[0][0] == torch_second[0][0]
    assert first[0][1] == pytest.approx(torch_first[0][1], abs=1e-4)


def test_source_padding_does_not_change_the_translation():
    torch.manual_seed(0)
    model = EncoderDecoder(config()).eval()
    source, padding = padded_batch([3, 9], seed=5)
    target = torch.randint(3, VOCAB, (1, 5))
    alone = model(source[:1, :3], target)
    batched = model(source, target.expand(2, -1), padding)[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)
    short = [source[0, :3].tolist() + [EOS_ID]]
    long = [source[1].tolist() + [EOS_ID]]
    greedy = GenerationConfig(max_new_tokens=6)
    assert decode_sources(model, short, greedy)[0] == decode_sources(model, short + long, greedy)[0]


def test_decoder_is_causal_and_sees_the_whole_source():
    torch.manual_seed(0)
    model = EncoderDecoder(config()).eval()
    source, target = torch.randint(3, VOCAB, (1, 6)), torch.randint(3, VOCAB, (1, 8))
    changed_target = target.clone()
    changed_target[0, 5] = (target[0, 5] + 1) % VOCAB
    before, after = model(source, target), model(source, changed_target)
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])
    changed_source = source.clone()
    changed_source[0, -1] = (source[0, -1] + 1) % VOCAB
    assert not torch.allclose(model(changed_source, target)[:, 0], before[:, 0])


def test_training_loss_is_label_smoothed_cross_entropy_over_real_target_tokens():
    torch.manual_seed(0)
    translator = Translator(config(), label_smoothing=0.1)
    logging = SimpleNamespace(should_update_logs=True)  # a step that logs, as Lightning's connector says
    translator.trainer = type("FakeTrainer", (), {"world_size": 1, "_logger_connector": logging})()
    translator.log = lambda *args, **kwargs: None
    source, source_padding = padded_batch([5, 3], seed=6)
    target_input, target_padding = padded_batch([4, 2], seed=7)
    target = torch.randint(3, VOCAB, target_input.shape).masked_fill(target_padding, PAD_ID)
    batch = {
        "source": source,
        "source_padding": source_padding,
        "target_input": target_input,
        "target": target,
        "target_padding": target_padding,
    }
    loss = translator.training_step(batch, 0)

    log_probs = translator(batch).log_softmax(-1)[~target_padding]
    labels = target[~target_padding]
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    uniform = -log_probs.mean(-1)
    expected = (0.9 * nll + 0.1 * uniform).mean()
    torch.testing.assert_close(loss, expected)
    assert count_batch(translator.trainer, translator, batch).tokens == 6  # LoopControl's count of the step


class IdsAsText:
    """A tokenizer that writes token ids as text, so a translation shows exactly which ids were decoded."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return " ".join(map(str, ids))


def evaluation_batch(translator: Translator) -> tuple[dict, list[list[int]]]:
    """A batch of two padded sources, as the translation data gives them, and their token ids; the translator
    gets a fake trainer whose data module has an IdsAsText tokenizer."""
    datamodule = type("FakeData", (), {"tokenizer": IdsAsText()})()
    translator.trainer = type("FakeTrainer", (), {"world_size": 1, "datamodule": datamodule})()
    source, source_padding = padded_batch([5, 3], seed=8)
    sources = [row[~pad].tolist() for row, pad in zip(source, source_padding)]
    return {"source": source, "source_padding": source_padding}, sources


def test_translator_without_engine_decoding_names_the_callback_to_add():
    translator = Translator(config())
    batch, _ = evaluation_batch(translator)
    with pytest.raises(UserError, match="xlab.callbacks.EngineDecoding"):
        translator.translate_batch(batch)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_engine_decoding_hands_the_translator_the_engines_best_translation(num_beams: int):
    torch.manual_seed(0)
    translator = Translator(config(), num_beams=num_beams, max_new_tokens=6).eval()
    batch, sources = evaluation_batch(translator)
    EngineDecoding().setup(translator.trainer, translator, "validate")
    expected = decode_sources(translator.model, sources, GenerationConfig(max_new_tokens=6, num_beams=num_beams))
    assert translator.translate_batch(batch) == [" ".join(map(str, best[0][0])) for best in expected]


@pytest.mark.parametrize("option", ["num_beams", "max_new_tokens"])
def test_translator_refuses_decoding_settings_below_one(option: str):
    with pytest.raises(UserError, match=f"model.{option} must be at least 1"):
        Translator(config(), **{option: 0})


def test_corpus_scores_equal_sacrebleu():
    hypotheses = ["tre euro e dodici centesimi", "trecentododici", "mille", "venti euro e un centesimo"]
    references = ["tre euro e dodici centesimi", "trecentotredici", "mille", "venti euro e due centesimi"]
    scores = corpus_scores(hypotheses, references)
    assert scores["exact_match"] == 0.5
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, [references]).score)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2}, {"positions": "rotary"}])
def test_cached_and_uncached_decoding_agree(options: dict):
    torch.manual_seed(0)
    arch = {"positions": options.pop("positions")} if "positions" in options else {}
    model = EncoderDecoder(config(**arch)).eval()
    sources = [[5, 6, 7, EOS_ID], [8, 9, EOS_ID], [10, 11, 12, 13, 14, 15, EOS_ID]]
    settings = GenerationConfig(max_new_tokens=10, **options)
    cached = decode_sources(model, sources, settings)
    uncached = decode_sources(model, sources, settings, cached=False)
    assert [[ids for ids, _ in rows] for rows in cached] == [[ids for ids, _ in rows] for rows in uncached]
    for rows, reference in zip(cached, uncached):
        assert [score for _, score in rows] == pytest.approx([score for _, score in reference], abs=1e-4)
    assert all(math.isfinite(score) for rows in cached for _, score in rows)


def test_cross_attention_keys_and_values_are_computed_once_per_layer():
    torch.manual_seed(0)
    model = EncoderDecoder(config()).eval()
    calls = []
    for block in model.decoder:
        block.cross_attn.kv_proj.register_forward_hook(lambda *args: calls.append(1))
    decode_sources(model, [[5, 6, EOS_ID], [7, EOS_ID]], GenerationConfig(max_new_tokens=6, num_beams=2))
    assert len(calls) == len(model.decoder)


def test_torch_implementation_refuses_options_it_cannot_express():
    from xlab.errors import UserError

    with pytest.raises(UserError, match="rotary"):
        TorchEncoderDecoder(config(positions="rotary"))
    with pytest.raises(UserError, match="swiglu"):
        TorchEncoderDecoder(config(activation="swiglu"))


def test_tied_target_embeddings_share_the_output_projection():
    tied, untied = EncoderDecoder(config(tie_embeddings=True)), EncoderDecoder(config(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert tied.source_embed.weight is not tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == VOCAB * 32
