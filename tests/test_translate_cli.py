"""Translation end to end: fit on local pairs, translate through infer.py, export, and the shipped config."""

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, run_cli, run_script
from tests.test_translation_data import PAIRS, write_tsv
from xlab.data.pairs import NumberPhrases


def translator_args(pairs: Path, *extra: str) -> list[str]:
    """A tiny translator trained long enough on a handful of pairs to learn them by heart."""
    return [
        "-c",
        str(ROOT / "conf" / "translate.yaml"),
        "--data.init_args.source=xlab.data.pairs.ParallelFiles",
        f"--data.init_args.source.init_args.paths=[{pairs}]",
        "--data.init_args.vocab_size=300",
        "--data.init_args.context_length=24",
        "--data.init_args.batch_size=8",
        "--model.init_args.arch.n_layers=2",
        "--model.init_args.arch.d_model=64",
        "--model.init_args.arch.dropout=0.0",
        "--model.init_args.optimizer.lr=3e-3",
        "--model.init_args.optimizer.warmup_steps=20",
        "--trainer.max_steps=250",
        "--trainer.val_check_interval=125",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The best checkpoint of a translator that has overfitted PAIRS."""
    workdir = tmp_path_factory.mktemp("translate")
    pairs = write_tsv(workdir / "pairs.tsv")
    result = run_script("xlab.py", "fit", *translator_args(pairs), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "runs" / "translate" / "checkpoints" / "last.ckpt"


def test_training_logs_translation_scores_and_examples(trained: Path):
    events = EventAccumulator(str(trained.parent.parent), size_guidance={"tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/tokens_per_sec", "val/loss", "val/exact_match", "val/bleu", "val/chrf"):
        assert tag in scalars, tag
    assert [event.step for event in events.Scalars("val/exact_match")] == [124, 249]
    assert events.Scalars("val/exact_match")[-1].value == 1.0
    assert events.Scalars("val/chrf")[-1].value == pytest.approx(100.0)
    examples = events.Tensors("val/translations/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert examples.startswith("| source | translation | reference | exact |") and "| yes |" in examples


def test_infer_translates_the_learned_pairs_greedy_and_with_beams(trained: Path):
    sources = [source for source, _ in PAIRS[:5]]
    greedy = run_script("infer.py", str(trained), *sources, cwd=trained.parent)
    assert greedy.returncode == 0, greedy.stderr
    blocks = greedy.stdout.split("--- prompt ")[1:]
    assert [block.splitlines()[1] for block in blocks] == [target for _, target in PAIRS[:5]]
    beams = run_script("infer.py", str(trained), "twelve euro, five cents", "--num-beams", "4", cwd=trained.parent)
    assert beams.returncode == 0 and beams.stdout.strip() == "dodici euro e cinque centesimi"
    streamed = run_script("infer.py", str(trained), "two hundred", cwd=trained.parent)
    assert streamed.stdout == "duecento\n"


def test_export_translates_like_the_checkpoint_and_says_what_it_is(trained: Path):
    export = trained.parent / "translator.safetensors"
    result = run_script("manage.py", "export-checkpoint", str(trained), "-o", str(export), cwd=trained.parent)
    assert result.returncode == 0, result.stderr
    translated = run_script("infer.py", str(export), "three thousand and three", cwd=trained.parent)
    assert translated.stdout == "tremilatre\n"
    inspected = run_script("manage.py", "inspect", str(export), cwd=trained.parent)
    assert "encoder-decoder: 2 layers" in inspected.stdout and "encoder.0" in inspected.stdout
    refused = run_script("manage.py", "export-checkpoint", str(trained), "--format", "hf", cwd=trained.parent)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "translator" in refused.stderr


def test_translator_prompt_mistakes_are_one_clear_line(trained: Path):
    empty = run_script("infer.py", str(trained), "", cwd=trained.parent)
    assert empty.returncode == 2 and empty.stderr == "error: text 1 is empty: give something to translate\n"
    long = run_script("infer.py", str(trained), "one " * 40, cwd=trained.parent)
    assert long.returncode == 2 and long.stderr.startswith("error: text 1 has") and "shorten it" in long.stderr


def test_the_torch_reference_implementation_trains_and_validates(in_tmp: Path):
    pairs = write_tsv(in_tmp / "pairs.tsv")
    reference = [
        "--model.init_args.implementation=torch",
        "--trainer.max_steps=20",
        "--trainer.val_check_interval=10",
        "--trainer.log_every_n_steps=5",
    ]
    assert run_cli("fit", *translator_args(pairs, *reference)) == 0
    events = EventAccumulator(str(in_tmp / "runs" / "translate"))
    events.Reload()
    losses = [event.value for event in events.Scalars("train/loss")]
    assert losses[-1] < losses[0] and "val/chrf" in events.Tags()["scalars"]
    checkpoint = in_tmp / "runs" / "translate" / "checkpoints" / "last.ckpt"
    beams = "--model.init_args.num_beams=3"
    assert run_cli("test", *translator_args(pairs, *reference, beams), f"--ckpt_path={checkpoint}") == 0


def test_shipped_translation_config_runs_on_the_embedded_number_phrases(in_tmp: Path, capsys):
    small = [
        "--data.init_args.source.init_args.size=2000",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    assert run_cli("fit", "-c", str(ROOT / "conf" / "translate.yaml"), *small) == 0
    assert (in_tmp / "runs" / "translate" / "checkpoints" / "last.ckpt").exists()
    capsys.readouterr()
    assert (
        run_cli("stats", "-c", str(ROOT / "conf" / "translate.yaml"), "--data.init_args.source.init_args.size=2000")
        == 0
    )
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["split", "pairs", "dropped", "truncated"]
    assert "train" in table and "1,800" in table


def test_predict_writes_every_translation_of_the_predict_split(trained: Path):
    workdir = trained.parents[3]
    result = run_script(
        "xlab.py", "predict", *translator_args(workdir / "pairs.tsv"), f"--ckpt_path={trained}", cwd=workdir
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote runs/translate/predictions.jsonl" in result.stdout
    rows = [
        json.loads(line) for line in (workdir / "runs" / "translate" / "predictions.jsonl").read_text().splitlines()
    ]
    assert rows and all(set(row) == {"source", "translation", "reference"} for row in rows)
    assert all(row["translation"] == row["reference"] == dict(PAIRS)[row["source"]] for row in rows)


def test_two_process_validation_scores_every_translation_once(tmp_path: Path):
    """Exact match, BLEU and chrF over two processes equal the single-process figures (the outputs are gathered)."""
    pairs = NumberPhrases(size=400, seed=1).load()
    tsv = write_tsv(tmp_path / "pairs.tsv", list(zip(pairs["source"], pairs["target"])))
    args = translator_args(tsv, "--trainer.max_steps=40", "--trainer.val_check_interval=40")
    assert run_script("xlab.py", "fit", *args, cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / "runs" / "translate" / "checkpoints" / "last.ckpt"

    def scores(*extra: str) -> dict[str, float]:
        result = run_script("xlab.py", "validate", *args, *extra, f"--ckpt_path={checkpoint}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        found = re.findall(r"val/(exact_match|bleu|chrf)\s+│?\s*([0-9.]+)", result.stdout)
        return {name: float(value) for name, value in found}

    single = scores("--trainer.devices=1")
    assert set(single) == {"exact_match", "bleu", "chrf"} and 0 < single["chrf"] < 100
    ddp = scores("--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp")
    assert ddp == pytest.approx(single, abs=1e-3)
