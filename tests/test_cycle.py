"""The cycle translator: who gets gradients and who changes in each update, adapters, losses, accumulation,
resume, step counting, diagnostics, export and inference by direction, and its errors."""

import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from xlab.checkpoint import export, load
from xlab.data.cycle import CycleDataModule, source_ids
from xlab.data.pairs import NumberPhrases, ParallelFiles
from xlab.data.tokenizer import BOS_ID
from xlab.errors import UserError
from xlab.generation import best_targets
from xlab.infer_cli import main as infer
from xlab.loop import LoopControl
from xlab.manage_cli import main as manage
from xlab.models.config import TransformerConfig
from xlab.models.cycle import CycleTranslator, Mixing, evaluating, micro_batches
from xlab.models.cycle_adapters import DirectionAdapters, merged_direction
from xlab.models.cycle_synthetic import Diagnostics, SyntheticSources, is_copy
from xlab.models.optimizer import OptimizerConfig
from xlab.models.translator import Translator

ADAPTERS = DirectionAdapters(rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CycleDataModule:
    module = CycleDataModule(
        NumberPhrases(size=400, kinds=("cardinal",)),
        paired_size=16,
        val_size=8,
        test_size=8,
        vocab_size=300,
        batch_size=4,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    module.prepare_data()
    return module


def arch(data: CycleDataModule) -> TransformerConfig:
    return TransformerConfig(n_layers=1, d_model=32, n_heads=2, **data.model_shapes())


def translator(data: CycleDataModule, **options) -> CycleTranslator:
    torch.manual_seed(0)
    settings = {
        "optimizer": OptimizerConfig(lr=1e-2, warmup_steps=0),
        "synthetic": SyntheticSources(length_scale=1.0, length_offset=2, without_eos="keep"),
        "max_new_tokens": 8,
        "examples": 0,
    }
    return CycleTranslator(arch(data), **{**settings, **options})


def trainer(steps: int, root: Path | None = None, **options) -> Trainer:
    settings = {
        "max_steps": steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": root,
    }
    return Trainer(**{**settings, **options})


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class Recording(CycleTranslator):
    """Records every parameter before and after each direction's update, and which got gradients."""

    def _update(self, direction, batch):
        before = weights(self.network)
        loss = super()._update(direction, batch)
        self.updates.append((direction, before, weights(self.network)))
        return loss

    def clip_gradients(self, optimizer, **options):
        self.gradients.append({n for n, p in self.network.named_parameters() if p.grad is not None})
        super().clip_gradients(optimizer, **options)


def record_one_batch(data: CycleDataModule, **options) -> Recording:
    torch.manual_seed(0)
    module = Recording(
        arch(data),
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0),
        synthetic=SyntheticSources(length_scale=1.0, length_offset=2, without_eos="keep"),
        mixing=Mixing(paired_weight=0.0),
        max_new_tokens=8,
        examples=0,
        **options,
    )
    module.updates, module.gradients = [], []
    trainer(2).fit(module, data)
    return module


def changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {n for n in before if n.startswith(prefix) and not torch.equal(before[n], after[n])}


def test_two_models_only_the_trainee_gets_gradients_and_changes(data: CycleDataModule):
    module = record_one_batch(data)
    assert [direction for direction, _, _ in module.updates] == ["en-it", "it-en"]
    for (direction, before, after), gradients in zip(module.updates, module.gradients):
        other = module.network.reverse(direction)
        assert gradients and all(name.startswith(f"models.{direction}.") for name in gradients)
        assert not changed(before, after, f"models.{other}.")  # the generating direction: bit-identical
        assert changed(before, after, f"models.{direction}.")


def test_adapters_with_a_frozen_base_change_only_the_trainee_adapter(data: CycleDataModule):
    module = record_one_batch(data, implementation="adapters", transforms=[ADAPTERS])
    for (direction, before, after), gradients in zip(module.updates, module.gradients):
        other = module.network.reverse(direction)
        assert gradients and all(f".{direction}." in name for name in gradients)
        moved = changed(before, after)
        assert moved and all(f".{direction}." in name for name in moved)
        assert not any(f".{other}." in name for name in moved)


def test_shared_topology_trains_one_model_with_one_optimizer(data: CycleDataModule):
    module = record_one_batch(data, implementation="shared")
    assert module.optimizer_of == {"en-it": 0, "it-en": 0}
    for _, before, after in module.updates:
        assert changed(before, after, "model.")


def test_a_batch_counts_one_step_per_direction_update(data: CycleDataModule):
    module = translator(data)
    run = trainer(4)
    run.fit(module, data)
    assert run.global_step == 4 and run.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert run.train_dataloader.state_dict()["taken"]["en"] == 2 * data.batch_size


def test_adapters_switch_and_each_direction_computes_with_its_own(data: CycleDataModule):
    module = translator(data, implementation="adapters", transforms=[ADAPTERS])
    network = module.network
    with torch.no_grad():
        for direction, scale in zip(network.directions, (0.5, 0.7)):
            for parameter in network.adapter_parameters(direction):
                parameter.normal_(0, scale)
    source, target = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 4))
    network.eval()
    outputs = {d: network.direction(d)(source, target) for d in (*network.directions, network.directions[0])}
    forward, backward = network.directions
    assert not torch.allclose(outputs[forward], outputs[backward])
    assert torch.equal(network.direction(forward)(source, target), outputs[forward])  # after switching back
    for direction in network.directions:
        plain = merged_direction(network.model, direction).eval()
        torch.testing.assert_close(plain(source, target), network.direction(direction)(source, target))


def test_padding_never_reaches_the_loss_and_k_micro_batches_equal_one_batch(data: CycleDataModule):
    data.setup("fit")
    pairs = next(iter(data.train_dataloader()))["en-it"]
    padded = {key: value for key, value in pairs.items()}
    for key in ("source", "target_input", "target"):
        padded[key] = torch.cat([pairs[key], torch.full_like(pairs[key][:, :2], 0)], 1)
    for key in ("source_padding", "target_padding"):
        padded[key] = torch.cat([pairs[key], torch.ones_like(pairs[key][:, :2])], 1)
    gradients = []
    for accumulate, batch in ((1, pairs), (1, padded), (3, padded)):
        module = translator(data, accumulate=accumulate)
        module._trainer = trainer(1)
        module._trainer.strategy.connect(module)
        loss = module._backward("en-it", batch, 1.0)
        gradients.append(
            (loss, {n: p.grad.clone() for n, p in module.network.named_parameters() if p.grad is not None})
        )
    (loss, reference), *others = gradients
    assert len(list(micro_batches(padded, 3))) == 3
    for other_loss, other in others:
        assert other_loss == pytest.approx(loss, rel=1e-5) and other.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], atol=1e-6, rtol=1e-4)


def test_resume_mid_run_repeats_no_step_and_ends_with_the_same_weights(data: CycleDataModule, tmp_path: Path):
    schedule = OptimizerConfig(lr=1e-2, warmup_steps=2, decay_steps=6)  # the same however far a run goes
    whole = translator(data, optimizer=schedule)
    trainer(6).fit(whole, data)
    first = translator(data, optimizer=schedule)
    interrupted = trainer(2, tmp_path)
    interrupted.fit(first, data)
    interrupted.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_module = translator(data, optimizer=schedule)
    resumed = trainer(6, tmp_path)
    resumed.fit(resumed_module, data, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.global_step == 6 and resumed.train_dataloader.state_dict()["taken"]["en"] == 3 * data.batch_size
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(resumed_module)[name], value, atol=0, rtol=0)


def test_each_directions_schedule_decays_over_its_share_of_a_step_budget(data: CycleDataModule):
    """``loop.stop_at: 12 steps`` and no step limit: two directions' optimizers take turns, six updates each, and
    each one's rate reaches the floor at its own last update, not before."""
    rates: dict[str, list[float]] = {"en-it": [], "it-en": []}

    class Rates(CycleTranslator):
        def _update(self, direction, batch):
            rates[direction].append(self._optimizer(direction)[0].param_groups[0]["lr"])
            return super()._update(direction, batch)

    torch.manual_seed(0)
    module = Rates(
        arch(data),
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0, min_lr_ratio=0.1),
        synthetic=SyntheticSources(length_scale=1.0, length_offset=2, without_eos="keep"),
        max_new_tokens=8,
        examples=0,
    )
    control = LoopControl(stop_at="12 steps", metrics_csv=False, progress_bar=False)
    trainer(-1, max_epochs=-1, callbacks=[control]).fit(module, data)
    for seen in rates.values():
        assert len(seen) == 6 and seen[0] == pytest.approx(1e-2)
        assert seen[-1] == pytest.approx(1e-3) and seen[-2] > 1e-3 * 1.01, seen


def test_a_cold_start_reports_its_copy_rate(tmp_path: Path):
    unpaired = CycleDataModule(
        NumberPhrases(size=400, kinds=("cardinal",)),
        paired_size=0,
        val_size=8,
        test_size=8,
        vocab_size=300,
        batch_size=4,
        cache_dir=str(tmp_path),
    )
    module = translator(unpaired)
    run = trainer(2, log_every_n_steps=1)
    run.fit(module, unpaired)
    metrics = run.logged_metrics
    for direction in ("en-it", "it-en"):
        for name in ("copy_rate", "distinct_rate", "eos_rate", "length_ratio", "dropped"):
            assert f"train/{direction}/{name}" in metrics
        assert f"train/{direction}/cycle_loss" in metrics and f"train/{direction}/paired_loss" not in metrics


def test_diagnostics_count_copies_lengths_and_endings():
    diagnostics = Diagnostics()
    diagnostics.add("trecento", "trecento", 3, 3, True, True)
    diagnostics.add("trecentouno", "trecentounò", 4, 4, False, False)
    diagnostics.add("three", "tre", 2, 4, True, True)
    diagnostics.add("three", "quattro", 2, 4, True, True)
    rates = diagnostics.rates()
    expected = {"copy_rate": 2 / 4, "distinct_rate": 3 / 4, "eos_rate": 3 / 4, "length_ratio": 11 / 15, "dropped": 1.0}
    assert rates == {**expected, "unconfident": 0.0}
    assert not is_copy("three hundred", "trecento")


def mean_log_prob(model: torch.nn.Module, source: list[int], output: list[int]) -> float:
    """The mean token log-probability of ``output`` (end-of-sequence included) given ``source``, teacher-forced."""
    target = torch.tensor([output])
    logits = model(torch.tensor([source]), torch.tensor([[BOS_ID, *output[:-1]]]))
    return float(logits.log_softmax(-1).gather(-1, target[..., None]).mean())


class ConfidenceRecording(CycleTranslator):
    """Records, per synthetic batch, the real sentences kept, and the ones expected: the greedy translations'
    top half by a teacher-forced mean log-probability."""

    def synthesize(self, generating, real):
        model = self.model.direction(generating)
        sources = [source_ids(ids) for ids in real["ids"]]
        with torch.no_grad(), evaluating(self.model):
            outputs = best_targets(model, sources, 1, max(map(self.synthetic.limit, map(len, sources))))
            confidences = [mean_log_prob(model, source, output) for source, output in zip(sources, outputs)]
        ranked = sorted(range(len(sources)), key=lambda index: -confidences[index])
        self.expected.append({real["text"][index] for index in ranked[: len(sources) // 2]})
        pairs = super().synthesize(generating, real)
        self.kept.append(set(pairs["reference"]))
        return pairs


def test_keep_confident_trains_on_the_most_likely_half_of_the_translations(data: CycleDataModule):
    torch.manual_seed(0)
    synthetic = SyntheticSources(length_scale=1.0, length_offset=2, without_eos="keep", keep_confident=0.5)
    module = ConfidenceRecording(arch(data), synthetic=synthetic, max_new_tokens=8, examples=0)
    module.expected, module.kept = [], []
    run = trainer(4, log_every_n_steps=1)
    run.fit(module, data)
    assert len(module.kept) == 4 and all(len(kept) == data.batch_size // 2 for kept in module.kept)
    assert module.kept == module.expected
    assert run.logged_metrics["train/en-it/unconfident"] == data.batch_size // 2


def test_keep_confident_keeps_the_highest_share_rounded_up():
    scores = [-1.0, -3.0, -2.0, -0.5, -4.0]
    assert SyntheticSources(keep_confident=0.4).most_confident(scores) == {0, 3}
    assert SyntheticSources(keep_confident=0.5).most_confident(scores) == {0, 2, 3}
    assert SyntheticSources().most_confident(scores) == set(range(5))
    assert SyntheticSources().confidence([5, 6, 7, 8], -2.0) == -0.5
    assert SyntheticSources(strategy="beam").confidence([5, 6, 7, 8], -0.5) == -0.5
    with pytest.raises(UserError, match="keep_confident in"):
        SyntheticSources(keep_confident=0.0)


def test_noise_drops_fills_and_shuffles_locally():
    tokens = list(range(10, 60))
    assert SyntheticSources().noise(tokens, random.Random(0)) == tokens
    shuffled = SyntheticSources(shuffle_distance=3).noise(tokens, random.Random(0))
    assert sorted(shuffled) == tokens and shuffled != tokens
    assert all(abs(shuffled.index(t) - i) <= 3 for i, t in enumerate(tokens))
    dropped = SyntheticSources(word_drop=0.5).noise(tokens, random.Random(0))
    assert 10 < len(dropped) < 40 and dropped == sorted(dropped)


def test_export_inspect_and_infer_carry_both_directions(data: CycleDataModule, tmp_path: Path, capsys):
    module = translator(data, implementation="shared")
    run = trainer(2, tmp_path)
    run.fit(module, data)
    run.save_checkpoint(tmp_path / "cycle.ckpt")
    exported = export(tmp_path / "cycle.ckpt", tmp_path / "cycle.safetensors")
    loaded = load(exported)
    assert loaded.model.directions == ("en-it", "it-en")
    for name, value in module.network.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    assert manage(["inspect", str(exported)]) == 0 and "directions  en-it, it-en" in capsys.readouterr().out
    assert infer([str(exported), "--direction", "it-en", "trecento", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert infer([str(exported), "trecento"]) == 2
    assert "choose one with --direction (en-it or it-en)" in capsys.readouterr().err
    assert infer([str(exported), "--direction", "de-it", "trecento"]) == 2
    assert "has no direction 'de-it'" in capsys.readouterr().err
    assert manage(["export-checkpoint", str(tmp_path / "cycle.ckpt"), "--format", "hf"]) == 2
    assert "cycle" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"implementation": "two_models", "transforms": [ADAPTERS]}, "DirectionAdapters are for the adapters"),
        ({"implementation": "adapters"}, "needs xlab.models.cycle_adapters.DirectionAdapters"),
        ({"mixing": Mixing(denoising_weight=1.0)}, "denoising_weight is for the shared topology"),
        ({"init_from": {"en-de": "x.ckpt"}}, "has no direction 'en-de'"),
    ],
)
def test_bad_model_settings_are_one_clear_error(data: CycleDataModule, options: dict, message: str):
    with pytest.raises(UserError, match=message):
        translator(data, **options)


class PartsRecording(CycleTranslator):
    """Records which losses each update mixed."""

    def _loss_parts(self, direction, batch):
        parts = super()._loss_parts(direction, batch)
        self.parts.append((self.global_step, direction, sorted(parts)))
        return parts


def test_paired_warm_up_then_cycle_and_denoising_for_shared(data: CycleDataModule):
    torch.manual_seed(0)
    mixing = Mixing(cycle_start=2, denoising_weight=0.5)
    keep = SyntheticSources(without_eos="keep", length_offset=2)  # a cold start ends no translation
    module = PartsRecording(arch(data), implementation="shared", mixing=mixing, synthetic=keep, examples=0)
    module.parts = []
    trainer(4).fit(module, data)
    assert module.parts == [
        (0, "en-it", ["denoising", "paired"]),
        (1, "it-en", ["denoising", "paired"]),
        (2, "en-it", ["cycle", "denoising", "paired"]),
        (3, "it-en", ["cycle", "denoising", "paired"]),
    ]


def test_paired_weight_ramps_linearly_then_holds():
    mixing = Mixing(paired_weight=1.0, paired_weight_end=0.2, paired_ramp_steps=100)
    assert [mixing.paired(step) for step in (0, 50, 100, 500)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert Mixing(paired_weight=0.3).paired(10_000) == 0.3


def write_translator_checkpoint(data: CycleDataModule, path: Path) -> Translator:
    """A paired-only translator of the same shape and tokenizer, as a training checkpoint."""
    torch.manual_seed(1)
    paired = Translator(arch(data))
    state = {f"model.{name}": value for name, value in paired.model.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": dict(paired.hparams), "data": {"tokenizer": data.tokenizer.to_str()}},
        path,
    )
    return paired


@pytest.mark.parametrize("implementation", ["two_models", "shared"])
def test_initialisation_from_a_paired_only_translator(data: CycleDataModule, tmp_path: Path, implementation: str):
    data.setup("fit")
    paired = write_translator_checkpoint(data, tmp_path / "paired.ckpt")
    module = translator(data, implementation=implementation, init_from={"it-en": str(tmp_path / "paired.ckpt")})
    untouched = weights(module.network)
    module._initialise_from_translators(data)
    if implementation == "two_models":
        source, target = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 4))
        paired.model.eval(), module.network.eval()
        torch.testing.assert_close(module.network.direction("it-en")(source, target), paired.model(source, target))
        assert not changed(untouched, weights(module.network), "models.en-it.")
        return
    shared = module.network.model.state_dict()
    for name, value in paired.model.state_dict().items():
        assert torch.equal(shared[name][: len(value)], value)
    # the rows a translator lacks (language tokens, one more position) keep their own initialisation
    assert torch.equal(shared["source_embed.weight"][-2:], untouched["model.source_embed.weight"][-2:])


def digit_phrases(path: Path, count: int = 3000) -> Path:
    """Two made-up languages of 2 to 4 digit words, word for word: a task a tiny model learns in seconds."""
    english = "zero one two three four five six seven eight nine".split()
    french = "zéro un deux trois quatre cinq six sept huit neuf".split()
    rng, rows = random.Random(0), set()
    while len(rows) < count:
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
        rows.add((" ".join(english[d] for d in digits), " ".join(french[d] for d in digits)))
    path.write_text("".join(f"{a}\t{b}\n" for a, b in sorted(rows)))
    return path


def test_back_translation_lifts_a_weak_paired_start_beyond_paired_training_alone(tmp_path: Path):
    """From a translator trained briefly on 100 pairs, the same number of further updates with back-translation
    on the monolingual pools beats the same updates on the pairs alone, in both directions' val exact match."""
    digits = CycleDataModule(
        ParallelFiles([str(digit_phrases(tmp_path / "digits.tsv"))]),
        languages=("en", "fr"),
        paired_size=100,
        val_size=100,
        test_size=8,
        vocab_size=300,
        batch_size=16,
        cache_dir=str(tmp_path / "cache"),
    )
    digits.prepare_data()
    shape = TransformerConfig(n_layers=1, d_model=64, n_heads=4, **digits.model_shapes())
    optimizer = OptimizerConfig(lr=3e-3, warmup_steps=0, decay_steps=10**6, weight_decay=0.0)

    def model(mixing: Mixing) -> CycleTranslator:
        torch.manual_seed(0)
        options = {"max_new_tokens": 16, "examples": 0, "label_smoothing": 0.0}
        return CycleTranslator(shape, languages=("en", "fr"), optimizer=optimizer, mixing=mixing, **options)

    def exact_match(module: CycleTranslator, steps: int, start: Path | None = None) -> dict[str, float]:
        run = trainer(steps, tmp_path, num_sanity_val_steps=0, limit_val_batches=None, val_check_interval=10**6)
        run.fit(module, digits, ckpt_path=start)
        run.validate(module, digits, verbose=False)
        if start is None:
            run.save_checkpoint(tmp_path / "weak.ckpt")
        return {d: float(run.callback_metrics[f"val/{d}/exact_match"]) for d in ("en-fr", "fr-en")}

    weak = exact_match(model(Mixing(cycle_weight=0.0)), 300)
    paired = exact_match(model(Mixing(cycle_weight=0.0)), 600, tmp_path / "weak.ckpt")
    cycled = exact_match(model(Mixing(cycle_weight=1.0)), 600, tmp_path / "weak.ckpt")
    for direction in ("en-fr", "fr-en"):
        assert weak[direction] < 0.6  # deliberately weak
        # measured at seed 0: +0.17, +0.31; over seeds 0-3 the lift ranges from +0.13 to +0.37
        assert cycled[direction] > paired[direction] + 0.1, (weak, paired, cycled)
