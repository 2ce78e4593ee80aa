"""The genomic bottleneck through the command lines: training with accumulation and on two processes, the
checkpoint's counts, inspect, both exports and one-line errors."""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors import safe_open

from tests.conftest import run_cli, run_script, tiny_args, write_corpus
from xlab.checkpoint import export, load, load_model, read_checkpoint
from xlab.generation import GenerationConfig, generate
from xlab.manage_cli import main as manage
from xlab.models.config import TransformerConfig
from xlab.models.genomic import GenomicBottleneck
from xlab.models.lm import LanguageModel


def genomic(settings: str) -> str:
    """The override that gives the model a genome with ``settings`` (YAML flow mapping contents)."""
    transform = f"{{class_path: xlab.models.genomic.GenomicBottleneck, init_args: {{{settings}}}}}"
    return f"--model.init_args.transforms=[{transform}]"


GENOME = genomic("tile: [32, 32], width: 8")


class GenomeRecorder(Callback):
    """Test helper: each rank writes ``genomeN.json``: its genome's parameters at the start and end of training,
    how many predictions it made and how many micro-batches it trained on."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.batches = 0

    def state(self, pl_module: LightningModule) -> list[list[float]]:
        return [p.detach().flatten().tolist() for p in pl_module.model.genome.parameters()]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = self.state(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.batches += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "start": self.start,
            "end": self.state(pl_module),
            "predictions": pl_module.model.genome.predictions,
            "batches": self.batches,
        }
        (self.directory / f"genome{trainer.global_rank}.json").write_text(json.dumps(record))


def recorder(directory: Path) -> list[str]:
    return ["--trainer.callbacks+=tests.test_genomic_cli.GenomeRecorder", f"--trainer.callbacks.directory={directory}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("genomic")
    corpus = write_corpus(directory / "corpus")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        assert run_cli("fit", *tiny_args(corpus, GENOME)) == 0
    finally:
        os.chdir(cwd)
    return directory / "runs" / "defaults" / "checkpoints" / "last.ckpt"


def test_with_accumulation_the_weights_are_predicted_once_per_optimizer_step(in_tmp: Path, corpus: Path):
    overrides = ["--trainer.max_steps=3", "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0"]
    assert run_cli("fit", *tiny_args(corpus, GENOME, *overrides, *recorder(in_tmp))) == 0
    record = json.loads((in_tmp / "genome0.json").read_text())
    assert record["batches"] == 6 and record["predictions"] == 3
    assert record["start"] != record["end"]


def test_two_processes_keep_their_genomes_identical(tmp_path: Path):
    corpus = write_corpus(tmp_path / "corpus")
    devices = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    args = tiny_args(corpus, GENOME, "--trainer.max_steps=4", "--trainer.limit_val_batches=0", *devices)
    result = run_script("xlab.py", "fit", *args, *recorder(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"genome{rank}.json").read_text()) for rank in (0, 1))
    assert first["start"] == second["start"] and first["end"] == second["end"] and first["start"] != first["end"]


def test_the_checkpoint_and_inspect_carry_the_compression_counts(trained: Path, capsys):
    loaded = load(trained)
    report = loaded.model.transforms[0].report(loaded.model)
    assert read_checkpoint(trained)["transform_reports"] == {"genomic": report}
    assert manage(["inspect", str(trained)]) == 0
    shown = capsys.readouterr().out
    assert f"genomic: matrices 10, replaced {report['replaced']:,}, stored {report['stored']:,}" in shown
    assert f"ratio {report['ratio']:,.2f}, model ratio {report['model_ratio']:,.2f}" in shown


def tensor_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as file:
        return sum(file.get_tensor(key).nbytes for key in file.keys())


def test_both_exports_give_the_checkpoints_logits_and_text_and_the_compact_one_is_smaller_by_the_ratio(
    trained: Path, tmp_path: Path
):
    plain, compact = tmp_path / "plain.safetensors", tmp_path / "genome.safetensors"
    assert manage(["export-checkpoint", str(trained), "-o", str(plain)]) == 0
    assert manage(["export-checkpoint", str(trained), "-o", str(compact), "--genome"]) == 0
    original, tokenizer = load_model(trained)
    tokens = torch.randint(0, original.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    config, prompts = GenerationConfig(max_new_tokens=12), ["The model", "attention mixes"]
    with torch.no_grad():
        reference = original(tokens)
    text = generate(original, tokenizer, prompts, config)
    for path, transforms in ((plain, []), (compact, ["genomic"])):
        restored, restored_tokenizer = load_model(path)
        assert [t.name for t in restored.transforms] == transforms
        with torch.no_grad():
            assert torch.equal(restored(tokens), reference), path.name
        assert generate(restored, restored_tokenizer, prompts, config) == text
    with safe_open(str(compact), framework="pt") as file:
        assert not [key for key in file.keys() if key.endswith("_proj.weight")]
    model_ratio = original.transforms[0].report(original)["model_ratio"]
    assert tensor_bytes(plain) / tensor_bytes(compact) == pytest.approx(model_ratio, rel=1e-9)
    assert compact.stat().st_size < plain.stat().st_size
    assert export(compact, tmp_path / "folded.safetensors").stat().st_size == plain.stat().st_size


def test_a_pattern_that_matches_nothing_is_one_error_line(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus, genomic("include: [nope]"))) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the genomic transform: the pattern 'nope' matches no parameter of the Decoder"
    )


def test_a_genome_starts_from_a_dense_checkpoint_and_fine_tunes(in_tmp: Path, corpus: Path):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.logger.init_args.name=dense")) == 0
    dense_path = in_tmp / "runs" / "dense" / "checkpoints" / "last.ckpt"
    dense = load(dense_path).model
    arch = TransformerConfig(**read_checkpoint(dense_path)["hyper_parameters"]["arch"])
    fitted = {}
    for steps in (0, 40):
        torch.manual_seed(0)
        transform = GenomicBottleneck(tile=(32, 32), width=8, init_from=str(dense_path), fit_steps=steps)
        fitted[steps] = LanguageModel(arch, transforms=[transform]).model
    assert torch.equal(fitted[40].embed.weight, dense.embed.weight)
    assert torch.equal(fitted[40].blocks[1].norms[0].bias, dense.blocks[1].norms[0].bias)
    targets = [dense.get_parameter(f"blocks.{layer}.mlp.in_proj.weight") for layer in (0, 1)]

    def error(network: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum((network.blocks[i].mlp.in_proj.weight - t).square().sum().item() for i, t in enumerate(targets))

    assert error(fitted[40]) < 0.9 * error(fitted[0])
    tune = genomic(f"tile: [32, 32], width: 8, init_from: {dense_path}, fit_steps: 5")
    assert run_cli("fit", *tiny_args(corpus, tune, "--trainer.logger.init_args.name=tuned")) == 0
    recorded = read_checkpoint(in_tmp / "runs" / "tuned" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert "init_from" not in recorded["transforms"][0]["settings"]
