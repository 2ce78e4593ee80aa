"""Schedules that follow the budget that ends the run: steps, tokens and (on a fake clock) time."""

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from tests.test_loop import FakeClock
from xlab.loop import LoopControl
from xlab.models.config import TransformerConfig
from xlab.models.lm import LanguageModel
from xlab.models.optimizer import OptimizerConfig

BATCH, TIME = 2, 8  # 16 tokens a step
PEAK, FLOOR = 1e-3, 0.1


def batches(count: int = 200) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input": torch.randint(0, 32, (BATCH, TIME), generator=generator),
            "target": torch.randint(0, 32, (BATCH, TIME), generator=generator),
            "target_bytes": torch.ones(BATCH, TIME, dtype=torch.long),
        }
        for _ in range(count)
    ]


class Steps(Callback):
    """Advances the fake clock by ``seconds(step)`` during each step, and records the rate each step trains at.
    After LoopControl among the callbacks, so the clock moves once LoopControl has read the step's start."""

    def __init__(self, clock: FakeClock, seconds=lambda step: 1.0):
        self.clock, self.seconds = clock, seconds
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.clock.now += self.seconds(trainer.global_step)


def train(tmp_path: Path, stop_at: str, max_steps: int = -1, schedule: str = "cosine", **steps) -> Steps:
    clock = FakeClock()
    control = LoopControl(stop_at=stop_at, metrics_csv=False, progress_bar=False)
    control.clock = clock
    recorder = Steps(clock, **steps)
    arch = TransformerConfig(vocab_size=32, context_length=TIME, n_layers=1, d_model=16, n_heads=2)
    optimizer = OptimizerConfig(lr=PEAK, warmup_steps=3, min_lr_ratio=FLOOR, schedule=schedule)
    trainer = Trainer(
        max_steps=max_steps,
        max_epochs=-1 if max_steps < 0 else None,
        callbacks=[control, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(LanguageModel(arch, optimizer), train_dataloaders=DataLoader(batches(), batch_size=None))
    assert trainer.global_step == len(recorder.rates)
    return recorder


def assert_ends_at_the_floor(rates: list[float], steps: int) -> None:
    assert len(rates) == steps
    assert rates[-1] == pytest.approx(PEAK * FLOOR)
    assert rates[-2] > PEAK * FLOOR * 1.01  # the floor comes at the last step, not before
    after_warmup = rates[3:]
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(after_warmup, after_warmup[1:]))


@pytest.mark.parametrize("schedule", ["cosine", "trapezoid"])
def test_a_time_budget_schedule_reaches_its_floor_at_the_budget(tmp_path: Path, schedule: str):
    """One second a step and a 40-second budget: 40 steps, the last at the floor, with no step limit at all."""
    recorder = train(tmp_path, "40 s", schedule=schedule)
    assert_ends_at_the_floor(recorder.rates, 40)


def test_a_time_budget_follows_a_changing_step_rate(tmp_path: Path):
    """Steps slow from 1 s to 2 s halfway: the estimate of the run's length is renewed and still ends at the floor."""
    recorder = train(tmp_path, "60 s", seconds=lambda step: 1.0 if step < 20 else 2.0)
    assert len(recorder.rates) == 20 + 20
    assert recorder.rates[-1] == pytest.approx(PEAK * FLOOR, rel=0.05)
    assert min(recorder.rates) == pytest.approx(PEAK * FLOOR, rel=0.05)


def test_a_token_budget_schedule_reaches_its_floor_at_the_token_budget(tmp_path: Path):
    recorder = train(tmp_path, "480 tokens", max_steps=1000)  # 16 tokens a step: 30 steps, well before max_steps
    assert_ends_at_the_floor(recorder.rates, 30)


def test_the_first_limit_to_end_the_run_sets_the_horizon(tmp_path: Path):
    recorder = train(tmp_path, "1h", max_steps=25)
    assert_ends_at_the_floor(recorder.rates, 25)
