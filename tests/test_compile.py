"""``model.init_args.compile``: the compiled network trains and evaluates as the eager one does."""

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_args
from tests.test_loop import csv_scalars
from xlab.checkpoint import load

# one full validation batch: a smaller last one would be a third shape to compile for
RUN = ["--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1"]
RUN += ["--trainer.limit_val_batches=1"]


def losses(name: str, corpus: Path, *extra: str) -> dict[str, dict[int, float]]:
    """Train and validation losses by step of a dropout-free tiny run logged under ``runs/name``."""
    args = tiny_args(corpus, *RUN, f"--trainer.logger.init_args.name={name}", *extra)
    assert run_cli("fit", *args) == 0
    scalars = csv_scalars(Path("runs") / name / "metrics.csv")
    return {key: scalars[key] for key in ("train/loss", "val/loss")}


def test_compiled_training_gives_the_eager_losses(in_tmp: Path, corpus: Path):
    torch._dynamo.reset()
    eager = losses("eager", corpus)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled = losses("compiled", corpus, "--model.init_args.compile=true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the network did go through dynamo
    assert sorted(compiled["train/loss"]) == sorted(eager["train/loss"]) == list(range(6))
    assert sorted(compiled["val/loss"]) == sorted(eager["val/loss"]) == [2, 5]
    for key, values in eager.items():
        assert compiled[key] == pytest.approx(values, rel=1e-4), key
    saved = load(Path("runs/compiled/checkpoints/last.ckpt")).model  # the compiled run's names load as they are
    assert sorted(saved.state_dict()) == sorted(load(Path("runs/eager/checkpoints/last.ckpt")).model.state_dict())
    torch._dynamo.reset()
