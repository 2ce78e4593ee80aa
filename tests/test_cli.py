"""The command line end to end: fit, validate, test, data subcommands, resume and bad input."""

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers import Tokenizer

from tests.conftest import ROOT, run_cli, run_script, tiny_args, write_corpus


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_validate_test_write_checkpoints_and_metrics(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus)) == 0
    run_dir = in_tmp / "runs" / "defaults"
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    logged = scalars(run_dir)
    for tag in ("train/loss", "train/accuracy", "train/bits_per_byte", "train/tokens_seen", "train/tokens_per_sec"):
        assert tag in logged, tag
    for tag in ("val/loss", "val/accuracy", "val/perplexity", "val/bits_per_byte", "lr-AdamW/matrices"):
        assert tag in logged, tag
    assert [step for step, _ in logged["val/loss"]] == [4, 9]
    assert logged["train/tokens_seen"][-1][1] == 10 * 8 * 32
    loss, perplexity = logged["val/loss"][-1][1], logged["val/perplexity"][-1][1]
    assert perplexity == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-4)

    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    tokenizer = Tokenizer.from_str(saved["LMDataModule"]["tokenizer"])
    assert tokenizer.decode(tokenizer.encode("attention mixes").ids) == "attention mixes"
    assert saved["hyper_parameters"]["arch"]["vocab_size"] == 300
    capsys.readouterr()
    assert run_cli("validate", *tiny_args(corpus), f"--ckpt_path={checkpoint}") == 0
    assert re.search(r"val/loss\s+│?\s*" + f"{loss:.4f}"[:5], capsys.readouterr().out)
    assert run_cli("test", *tiny_args(corpus), f"--ckpt_path={checkpoint}") == 0
    assert "test/bits_per_byte" in capsys.readouterr().out


def test_sample_text_reaches_tensorboard(in_tmp: Path, corpus: Path):
    sampler = ["--trainer.callbacks+=xlab.callbacks.SampleText", "--trainer.callbacks.prompts=[The model, attention]"]
    assert run_cli("fit", *tiny_args(corpus, *sampler, "--trainer.callbacks.every=4 steps")) == 0
    events = EventAccumulator(str(in_tmp / "runs" / "defaults"), size_guidance={"tensors": 0})
    events.Reload()
    samples = events.Tensors("samples/text_summary")
    assert [event.step for event in samples] == [4, 8, 10]
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("    The model") and "\n\n    attention" in text


def test_bf16_mixed_precision_trains_on_cpu(in_tmp: Path, corpus: Path):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.precision=bf16-mixed", "--trainer.max_steps=30")) == 0
    logged = scalars(in_tmp / "runs" / "defaults")
    losses = [value for _, value in logged["train/loss"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5


def test_resuming_with_other_model_settings_is_one_clear_line(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=5")) == 0
    assert run_cli("fit", *tiny_args(corpus, "--model.init_args.arch.d_model=32", "--ckpt_path=last")) == 2
    assert "do not fit the configured model (size mismatch" in capsys.readouterr().err


class Payload:
    """Unpickling this runs code: it touches the file it names."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_resuming_or_testing_a_checkpoint_never_unpickles_arbitrary_objects(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=5")) == 0
    last = in_tmp / "runs" / "defaults" / "checkpoints" / "last.ckpt"
    planted = in_tmp / "ran-on-load"
    torch.save({**torch.load(last, weights_only=True), "planted": Payload(planted)}, last)
    capsys.readouterr()
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=8", "--ckpt_path=last")) == 2
    assert "--weights_only false only if you trust the file" in capsys.readouterr().err
    assert run_cli("test", *tiny_args(corpus), f"--ckpt_path={last}") == 2
    assert not planted.exists()


def test_default_experiment_runs_on_the_embedded_corpus(in_tmp: Path):
    args = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2"]
    assert run_cli("fit", "-c", str(ROOT / "conf" / "xlab.yaml"), *args, "--trainer.enable_progress_bar=false") == 0
    assert (in_tmp / "runs" / "xlab" / "checkpoints" / "last.ckpt").exists()


def test_print_config_shows_the_whole_run(in_tmp: Path, corpus: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *tiny_args(corpus), "--print_config")
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "xlab.models.lm.LanguageModel"
    assert config["data"]["init_args"]["context_length"] == 32
    assert config["trainer"]["max_steps"] == 10
    assert config["checkpoint"]["monitor"] == "val/loss"


def test_linked_shapes_come_from_the_data(in_tmp: Path, corpus: Path):
    from xlab.cli import XLabCLI

    cli = XLabCLI(tiny_args(corpus, "--data.init_args.vocab_size=320"), run=False)
    assert cli.model.arch.vocab_size == 320 and cli.model.arch.context_length == 32


def test_stats_prints_every_split(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("stats", *tiny_args(corpus)) == 0
    out = capsys.readouterr().out
    for split in ("train", "val", "test", "predict"):
        assert re.search(rf"^{split}\s+\d+", out, re.MULTILINE), out
    assert "bytes/token" in out


def test_wikipedia_recipe_loads_a_local_dataset_of_the_same_shape(in_tmp: Path, capsys):
    from tests.test_data import write_wikipedia_like

    directory = write_wikipedia_like(in_tmp / "wiki")
    overrides = [
        f"--data.init_args.source.init_args.path={directory}",
        "--data.init_args.vocab_size=400",
        "--data.init_args.num_proc=2",
    ]
    assert run_cli("stats", "-c", str(ROOT / "conf" / "wikipedia.yaml"), *overrides) == 0
    assert re.search(r"^train\s+36\s", capsys.readouterr().out, re.MULTILINE)


def test_resume_from_last_is_exact(in_tmp: Path, corpus: Path):
    """Ten steps, then ten more from last.ckpt, end with the same weights as twenty steps at once."""
    common = tiny_args(corpus, "--model.init_args.optimizer.decay_steps=20", "--trainer.val_check_interval=10")
    assert run_cli("fit", *common, "--trainer.max_steps=20", "--trainer.logger.init_args.name=straight") == 0
    assert run_cli("fit", *common, "--trainer.logger.init_args.name=resumed") == 0
    last = in_tmp / "runs" / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 10
    assert (
        run_cli("fit", *common, "--trainer.max_steps=20", "--trainer.logger.init_args.name=resumed", "--ckpt_path=last")
        == 0
    )

    straight = torch.load(in_tmp / "runs" / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 20
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert resumed["lr_schedulers"][0]["last_epoch"] == straight["lr_schedulers"][0]["last_epoch"]
    steps = [step for step, _ in scalars(in_tmp / "runs" / "resumed")["train/loss"]]
    assert sorted(steps) == [4, 9, 14, 19]  # the resumed run continues the curve: no step logged twice


def test_new_run_refuses_to_overwrite_earlier_checkpoints(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=5")) == 0
    assert run_cli("fit", *tiny_args(corpus)) == 2
    assert "--ckpt_path last" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.init_args.arch.n_layerz=3"], "unknown option --model.init_args.arch.n_layerz=3"),
        (["--trainer.max_stepz=3"], "unrecognized arguments: --trainer.max_stepz=3"),
        (["--data.init_args.source.init_args.paths=[missing/*.txt]"], "no file matches 'missing/*.txt'"),
        (["--data.init_args.vocab_size=100"], "data.vocab_size 100 is too small"),
        (["--model.init_args.arch.max_positions=16"], "context length 32 exceeds the 16 positions"),
        (["--data.init_args.splits.val=0"], "the val split has 0 tokens"),
        (["--model.init_args.arch.activation=tanh"], "Expected a typing.Literal"),
        (["--ckpt_path=missing.ckpt"], "missing.ckpt"),
        (["--trainer.strategy=fsdp", "--trainer.accelerator=cpu"], "strategy `fsdp` requires a GPU accelerator"),
        (["--trainer.strategy=nosuch"], "invalid strategy name"),
        (["--trainer.devices=0"], "is not a valid input using cpu accelerator"),
    ],
)
def test_bad_input_is_one_clear_line(in_tmp: Path, corpus: Path, capsys, overrides: list[str], message: str):
    assert run_cli("fit", *tiny_args(corpus), *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_unknown_key_in_a_config_file_is_one_clear_line(in_tmp: Path, corpus: Path, capsys):
    (in_tmp / "bad.yaml").write_text("model:\n  init_args:\n    arch:\n      n_layerz: 3\n")
    assert run_cli("fit", *tiny_args(corpus), "-c", "bad.yaml") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: model (xlab.models.lm.LanguageModel): Group 'arch' does not accept option 'n_layerz' "
        "(--print_config lists every valid key)"
    ]


def test_empty_source_is_one_clear_line(in_tmp: Path, capsys):
    (in_tmp / "empty.txt").write_text("")
    result = run_script("xlab.py", "fit", *tiny_args(in_tmp), cwd=in_tmp)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: every file named by data.source")


def test_ctrl_c_leaves_a_resumable_last_checkpoint(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    args = tiny_args(corpus, "--trainer.max_steps=100000", "--trainer.val_check_interval=100000")
    args += ["--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=true"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "xlab.py"), "fit", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    events = tmp_path / "runs" / "defaults"
    deadline = time.monotonic() + 120
    while not list(events.glob("events.out.tfevents.*")) or not scalars(events).get("train/loss"):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "resume with the same command and --ckpt_path last" in output
    checkpoints = events / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} <= {"last.ckpt", "best.ckpt"}
    assert not list(tmp_path.rglob("*.tmp"))
    saved_step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    assert saved_step > 0

    resumed = run_script(
        "xlab.py", "fit", *args[:-2], f"--trainer.max_steps={saved_step + 3}", "--ckpt_path=last", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == saved_step + 3


def test_two_process_ddp_fits_and_reduces_metrics_across_ranks(tmp_path: Path):
    """Validation and test on two processes report the single-process figures: every sequence counted once."""
    corpus = write_corpus(tmp_path / "corpus")
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = run_script("xlab.py", "fit", *tiny_args(corpus, *ddp), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    checkpoint = tmp_path / "runs" / "defaults" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 10

    def evaluate(stage: str, *extra: str) -> float:
        result = run_script("xlab.py", stage, *tiny_args(corpus, *extra), f"--ckpt_path={checkpoint}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        prefix = {"validate": "val", "test": "test"}[stage]
        return float(re.search(rf"{prefix}/loss\s+│?\s*([0-9.]+)", result.stdout).group(1))

    for stage in ("validate", "test"):
        assert evaluate(stage, *ddp) == pytest.approx(evaluate(stage, "--trainer.devices=1"), abs=2e-4), stage


OVERLAYS = {"fsdp.yaml"}  # applied over the default experiment


@pytest.mark.parametrize(
    "name", sorted(path.name for path in (ROOT / "conf").glob("*.yaml") if path.name != "defaults.yaml")
)
def test_every_shipped_config_parses(name: str, capsys):
    """Each conf/*.yaml names only keys and values the CLI accepts (a renamed setting would leave one stale)."""
    configs = ["-c", str(ROOT / "conf" / "xlab.yaml")] if name in OVERLAYS else []
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *configs, "-c", str(ROOT / "conf" / name), "--print_config")
    assert exit_info.value.code == 0, capsys.readouterr().err
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("xlab.models.")
