"""Tokens per second, the time left and a running loss in Lightning's progress bar."""

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from xlab.loop.periods import format_duration

if TYPE_CHECKING:  # control.py imports this module to replace Lightning's bar
    from xlab.loop.control import LoopControl

LOSS_WINDOW = 20  # optimizer steps the progress bar averages the loss over


class LoopFigures:
    """Adds tokens per second, the time left (``eta``) and the loss averaged over recent steps to the metrics
    a Lightning progress bar shows; mixed into both of Lightning's bars below."""

    def __init__(self, loop: "LoopControl", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loop = loop
        self.losses: deque[torch.Tensor] = deque(maxlen=LOSS_WINDOW)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach())  # read when the bar refreshes: no device sync on the other steps
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.losses:
            metrics["loss"] = f"{torch.stack(list(self.losses)).float().mean().item():.3f}"
        tokens_per_second = self.loop.rate("tokens")
        if tokens_per_second:
            metrics["tok/s"] = f"{tokens_per_second:,.0f}"
        seconds_left = self.loop.seconds_left(trainer)
        if seconds_left is not None:
            metrics["eta"] = format_duration(seconds_left)
        return metrics


class LoopTQDMProgressBar(LoopFigures, TQDMProgressBar):
    """Lightning's tqdm bar with ``LoopFigures``."""


class LoopRichProgressBar(LoopFigures, RichProgressBar):
    """Lightning's rich bar with ``LoopFigures``."""

    def _get_train_description(self, current_epoch: int) -> str:
        """"Epoch N", without Lightning's "/-2" when ``max_epochs`` is -1 (no epoch limit, as a budget run has)."""
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


LOOP_PROGRESS_BARS = {TQDMProgressBar: LoopTQDMProgressBar, RichProgressBar: LoopRichProgressBar}
