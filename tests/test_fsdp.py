"""FSDP2 (``-c conf/fsdp.yaml``) on two CPU processes over gloo: training, whole checkpoints, exact resume,
decoding during training, and checkpoints that every command reads."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor

from tests.conftest import ROOT, run_cli, run_script, tiny_args
from tests.test_loop import csv_scalars
from tests.test_translate_cli import translator_args
from tests.test_translation_data import write_tsv
from xlab.checkpoint import export, load_model
from xlab.generation import GenerationConfig, generate
from xlab.models.config import TransformerConfig
from xlab.models.families import FAMILIES

TWO_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2"]
FSDP = ["-c", str(ROOT / "conf" / "fsdp.yaml")]


class Shards(Callback):
    """Test helper: each process writes ``shardsN.json``, the parameter elements it holds and the model's total,
    once the network is sharded and before a forward pass (after which the root unit keeps its whole weights)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in pl_module.parameters())
        counts = {"held": held, "total": sum(p.numel() for p in pl_module.parameters())}
        (self.directory / f"shards{trainer.global_rank}.json").write_text(json.dumps(counts))


def fit(cwd: Path, *args: str) -> None:
    result = run_script("xlab.py", "fit", *args, *FSDP, *TWO_PROCESSES, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]


def lm_args(corpus: Path, name: str, *extra: str) -> list[str]:
    """The tiny language model, sampling text every 3 steps (the first process decodes alone)."""
    sampling = ["--trainer.callbacks+=xlab.callbacks.SampleText", "--trainer.callbacks.prompts=[The model]"]
    sampling += ["--trainer.callbacks.every=3 steps", "--trainer.callbacks.max_new_tokens=6"]
    return tiny_args(
        corpus,
        "--model.init_args.optimizer.decay_steps=8",
        "--trainer.val_check_interval=4",
        f"--trainer.logger.init_args.name={name}",
        *sampling,
        *extra,
    )


def test_sharded_training_resumes_exactly_and_its_checkpoint_exports(tmp_path: Path, corpus: Path):
    shards = ["--trainer.callbacks+=tests.test_fsdp.Shards", f"--trainer.callbacks.directory={tmp_path}"]
    every_validation = ["--checkpoint.filename=step{step}", "--checkpoint.save_top_k=-1"]
    fit(tmp_path, *lm_args(corpus, "straight", "--trainer.max_steps=8", *shards, *every_validation))
    counts = [json.loads((tmp_path / f"shards{rank}.json").read_text()) for rank in (0, 1)]
    assert counts[0]["total"] == counts[1]["total"] == sum(count["held"] for count in counts)
    assert all(count["held"] < 0.6 * count["total"] for count in counts)  # each process holds about half
    halfway = tmp_path / "runs" / "straight" / "checkpoints" / "step4.ckpt"
    fit(tmp_path, *lm_args(corpus, "resumed", "--trainer.max_steps=8", f"--ckpt_path={halfway}"))

    checkpoints = {name: tmp_path / "runs" / name / "checkpoints" / "last.ckpt" for name in ("straight", "resumed")}
    straight, resumed = (torch.load(path, weights_only=True) for path in checkpoints.values())
    assert straight["global_step"] == resumed["global_step"] == 8
    assert straight["hyper_parameters"]["arch"]["d_model"] == 64
    assert straight["state_dict"]["model.embed.weight"].shape[1] == 64  # whole tensors, not one process's shard
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)

    original, tokenizer = load_model(checkpoints["straight"])
    restored, restored_tokenizer = load_model(export(checkpoints["straight"], tmp_path / "model.safetensors"))
    config, prompts = GenerationConfig(max_new_tokens=10), ["The model", "attention mixes"]
    assert generate(original, tokenizer, prompts, config) == generate(restored, restored_tokenizer, prompts, config)


def test_a_sharded_translator_decodes_its_validation_on_every_process(tmp_path: Path):
    """Each process decodes its own sources, for as many steps as they need, inside one gather of the weights."""
    pairs = write_tsv(tmp_path / "pairs.tsv")
    short = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--model.init_args.max_new_tokens=6"]
    fit(tmp_path, *translator_args(pairs, *short, "--trainer.log_every_n_steps=1"))
    run = tmp_path / "runs" / "translate"
    assert sorted(csv_scalars(run / "metrics.csv")["val/chrf"]) == [1, 3]  # Lightning logs step s under s - 1
    model, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert model.embed.weight.shape[1] == 64


def test_the_one_billion_parameter_recipe_is_sharded_and_about_1b(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "-c", str(ROOT / "conf" / "wikipedia-fsdp.yaml"), "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["strategy"]["class_path"] == "xlab.fsdp.FSDP"
    arch = config["model"]["init_args"]["arch"]
    arch.update(vocab_size=config["data"]["init_args"]["vocab_size"], context_length=2048)
    with torch.device("meta"):
        network = FAMILIES["lm"].build(TransformerConfig(**arch))
    assert 0.9e9 < sum(p.numel() for p in network.parameters()) < 1.1e9
