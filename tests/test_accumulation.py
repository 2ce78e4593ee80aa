"""Gradient accumulation: K micro-batches of B/K train exactly as one batch of B, and the loop counts alike."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.utils.data import DataLoader

from tests.test_loop import Recording
from xlab.callbacks import TokensPerSecond
from xlab.loop import LoopControl
from xlab.models.config import TransformerConfig
from xlab.models.lm import LanguageModel, OptimizerConfig

BATCH, CONTEXT, VOCAB = 8, 16, 64
TOKENS_PER_STEP = BATCH * CONTEXT
CLIP = 0.74  # between the gradient norms of this run's steps: some are clipped, some not


def windows(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` language-model samples in the DataModule's format, from one fixed random stream."""
    stream = torch.randint(VOCAB, (count, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    return [{"input": row[:-1], "target": row[1:], "target_bytes": torch.tensor(CONTEXT)} for row in stream]


class GradientNorms(Callback):
    """The norm of the gradient each optimizer step receives, before clipping."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))


def tiny_model() -> LanguageModel:
    """The same dropout-free model each call; no biases, since a key bias has a zero gradient in exact
    arithmetic, which Adam would turn from float noise into full-size, run-dependent steps."""
    torch.manual_seed(0)
    return LanguageModel(
        TransformerConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layers=1, d_model=32, n_heads=2, bias=False),
        OptimizerConfig(lr=1e-2, warmup_steps=2, decay_steps=6),
    )


def train(accumulate: int, tmp_path: Path) -> tuple[Trainer, LanguageModel, LoopControl, Recording, GradientNorms]:
    """Six optimizer steps of a tiny dropout-free model on the same 48 samples in the same order, stopped by
    a token budget that the fifth step crosses, with gradient clipping that acts on some steps."""
    model = tiny_model()
    control = LoopControl(stop_at=f"{5 * TOKENS_PER_STEP - 1} tokens", metrics_csv=False, progress_bar=False)
    logger, norms = Recording("lr-AdamW/matrices"), GradientNorms()
    trainer = Trainer(
        max_steps=6,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=CLIP,
        callbacks=[control, TokensPerSecond(), LearningRateMonitor("step"), norms],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    loader = DataLoader(windows(6 * BATCH), batch_size=BATCH // accumulate, shuffle=False)
    trainer.fit(model, loader)
    return trainer, model, control, logger, norms


@pytest.mark.parametrize("accumulate", [2, 4])
def test_micro_batches_give_the_update_of_the_whole_batch(tmp_path: Path, accumulate: int):
    whole, whole_model, whole_control, whole_lrs, whole_norms = train(1, tmp_path / "whole")
    split, split_model, split_control, split_lrs, split_norms = train(accumulate, tmp_path / "split")

    assert whole.global_step == split.global_step == 5  # the budget stops both after the fifth update
    assert split_control.progress.tokens == whole_control.progress.tokens == 5 * TOKENS_PER_STEP
    assert split_control.progress.steps == whole_control.progress.steps == 5
    # Lightning's monitor logs every micro-batch under the step's index: the same rate each time
    lrs = {step: [] for step in whole_lrs.steps}
    for step, lr in zip(split_lrs.steps, split_lrs.values):
        lrs[step].append(lr)
    assert sorted(lrs) == list(range(5))
    assert all(rates == pytest.approx([rate] * accumulate) for rates, rate in zip(lrs.values(), whole_lrs.values))
    assert split.callback_metrics["train/tokens_seen"] == 5 * TOKENS_PER_STEP
    # the summed micro-batch gradients are the whole batch's (Lightning scales each loss by 1/K), checked
    # directly since Adam's updates hardly depend on the gradient's scale; clipping them acts on some steps
    assert split_norms.norms == pytest.approx(whole_norms.norms, rel=1e-5) and len(whole_norms.norms) == 5
    assert min(whole_norms.norms) < CLIP < max(whole_norms.norms)
    for (name, mine), theirs in zip(split_model.named_parameters(), whole_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    moved = [(p - q).abs().max() for p, q in zip(whole_model.parameters(), tiny_model().parameters())]
    assert max(moved) > 1e-3  # the runs did train: equal weights are not just the initial ones
