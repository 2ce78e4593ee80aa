"""``LoopControl``: when to validate, checkpoint, log and stop, from what every optimizer step adds.

It counts samples and tokens (summed exactly over processes) and wall-clock time, decides from those
counts, saves ``last.ckpt``, calls ``Periodic`` callbacks such as ``SampleText``, and stops the run at
a budget.
"""

import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from xlab.errors import UserError
from xlab.loop.checkpoint_path import last_checkpoint_path
from xlab.loop.metrics_csv import MetricsCSV
from xlab.loop.periods import Period, Progress, format_duration, parse_optional
from xlab.loop.progress_bar import LOOP_PROGRESS_BARS

NEVER = sys.maxsize  # a step interval Lightning never reaches
RATE_WINDOW = 50  # optimizer steps over which tokens per second and the time left are measured


def tokens_in_batch(pl_module: LightningModule, batch: Any) -> int:
    """The tokens one process trains on in ``batch``: the module's ``tokens_in_batch(batch)`` when it has one
    (a translator counts its target tokens without padding), else every position of ``batch["input"]``."""
    count = getattr(pl_module, "tokens_in_batch", None)
    return int(count(batch)) if callable(count) else batch["input"].numel()


def optimizer_steps_in_batch(pl_module: LightningModule) -> int:
    """How much a stepping batch adds to ``trainer.global_step``: one, or the module's
    ``optimizer_steps_per_batch`` (under manual optimization Lightning counts every ``optimizer.step()``,
    so a cycle translator updating each of its two directions once a batch adds two)."""
    return int(getattr(pl_module, "optimizer_steps_per_batch", 1))


def samples_in_batch(batch: Any) -> int:
    """Sequences in a batch: the length of its first tensor (every tensor of a batch has one per sequence)."""
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    elif isinstance(batch, list | tuple):
        batch = batch[0]
    return len(batch)


class BatchCounts(NamedTuple):
    """What one batch adds to ``Progress``, summed over processes."""

    samples: int
    tokens: int


def count_batch(trainer: Trainer, pl_module: LightningModule, batch: Any) -> BatchCounts:
    """The samples and tokens of ``batch`` summed exactly over processes (one all-reduce under DDP): each
    process counts its own batch, whose tokens (a translator's unpadded targets) differ from the others'.
    A module with a ``samples_in_batch(batch)`` counts its own samples (a cycle batch holds several parts)."""
    count_samples = getattr(pl_module, "samples_in_batch", None)
    samples = int(count_samples(batch)) if callable(count_samples) else samples_in_batch(batch)
    counts = (samples, tokens_in_batch(pl_module, batch))
    if trainer.world_size > 1:
        summed = trainer.strategy.reduce(torch.tensor(counts, device=pl_module.device), reduce_op="sum")
        counts = tuple(summed.tolist())
    return BatchCounts(*counts)


class Periodic(Callback):
    """A callback that acts every ``every`` (a period): ``LoopControl`` decides when, from the same counts as
    its own periods, and calls ``on_period`` after the optimizer step that completes one."""

    def __init__(self, every: str, setting: str):
        self.every = Period.parse(every, setting)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if LoopControl.of(trainer) is None:
            raise UserError(f"{type(self).__name__} needs xlab.loop.LoopControl among the trainer's callbacks")

    def on_period(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError


class LoopControl(Callback):
    """When to validate, checkpoint and log, and when to stop, as periods and budgets in any unit of ``Progress``.

    Args:
        validate_every: validate after the step that completes each period; replaces
            ``trainer.val_check_interval``. None: Lightning's settings decide.
        checkpoint_every: save ``last.ckpt`` in the checkpoint directory after the step that completes each
            period (after the validation, when one falls on the same step).
        log_every: log the step's metrics after each period; replaces ``trainer.log_every_n_steps``.
        stop_at: one budget or a list; the run stops after the first optimizer step at which any is reached
            (count >= budget), validating first. ``trainer.max_steps`` still applies.
        metrics_csv: write every logged metric to ``metrics.csv`` in the run's log directory.
        progress_bar: show tokens per second, the time left and the running loss in Lightning's progress bar.

    Its token count is the run's only one: it logs it as ``train/tokens_seen`` and writes it into every
    checkpoint as ``tokens_seen``, as it was at the step saved.

    A step's periods are decided as it starts (so that Lightning's logging callbacks see the decision), from
    the counts as they will be when it ends; time is read as it starts. Budgets are checked as it ends.
    Seconds are wall time since training started, validation included, summed over resumed runs. Under
    gradient accumulation, decisions fall on batches that end with an optimizer step.
    """

    def __init__(
        self,
        validate_every: str | None = None,
        checkpoint_every: str | None = None,
        log_every: str | None = None,
        stop_at: str | list[str] | None = None,
        metrics_csv: bool = True,
        progress_bar: bool = True,
    ):
        self.validate_every = parse_optional(validate_every, "loop.validate_every")
        self.checkpoint_every = parse_optional(checkpoint_every, "loop.checkpoint_every")
        self.log_every = parse_optional(log_every, "loop.log_every")
        budgets = [] if stop_at is None else [stop_at] if isinstance(stop_at, str) else stop_at
        self.budgets = [Period.parse(budget, "loop.stop_at") for budget in budgets]
        self.metrics_csv = metrics_csv
        self.progress_bar = progress_bar
        self.clock: Callable[[], float] = time.monotonic  # replaceable, so tests need not sleep
        self.progress = Progress()
        self.decided = Progress()  # the progress at the last decision, the start of the previous stepping batch
        self.stepping = False  # whether the current batch ends with an optimizer step
        self.due: set[str] = set()
        self.due_callbacks: list[Periodic] = []
        self.checkpoint_after_validation = False
        self.validated_at = -1
        self.time_decides = False  # whether a period or budget is in seconds, so processes must agree on the time
        self.started = 0.0
        self.seconds_before = 0.0
        self.history: deque[Progress] = deque(maxlen=RATE_WINDOW)

    @staticmethod
    def of(trainer: Trainer) -> "LoopControl | None":
        return next((callback for callback in trainer.callbacks if isinstance(callback, LoopControl)), None)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.metrics_csv:
            self._attach_metrics_csv(trainer)
        if self.progress_bar:
            self._replace_default_progress_bar(trainer, pl_module, stage)
        if self.validate_every is not None:
            trainer.check_val_every_n_epoch = None

    def _attach_metrics_csv(self, trainer: Trainer) -> None:
        if trainer.loggers and not any(isinstance(logger, MetricsCSV) for logger in trainer.loggers):
            trainer.loggers = [*trainer.loggers, MetricsCSV(Path(trainer.log_dir) / MetricsCSV.FILE_NAME)]

    def _replace_default_progress_bar(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Swap a bar of exactly one of Lightning's two classes (the one it adds by itself) for the same bar with
        ``LoopFigures``, keeping its refresh rate; a bar of another class is left as it is."""
        for index, callback in enumerate(trainer.callbacks):
            replacement = LOOP_PROGRESS_BARS.get(type(callback))
            if replacement is not None:
                bar = replacement(self, refresh_rate=callback.refresh_rate)
                bar.setup(trainer, pl_module, stage)
                trainer.callbacks[index] = bar

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.progress.steps = trainer.global_step
        self.decided = replace(self.progress)
        self.started = self.clock()
        self.seconds_before = self.progress.seconds
        self.history.clear()
        periods = [self.validate_every, self.checkpoint_every, self.log_every, *self.budgets]
        periods += [callback.every for callback in trainer.callbacks if isinstance(callback, Periodic)]
        self.time_decides = any(period is not None and period.unit == "seconds" for period in periods)
        if self.validate_every is not None:
            # Lightning asks, before the first batch of a resumed run, whether the saved step validated.
            trainer.val_check_batch = 1 if self.validated_at == trainer.global_step else NEVER
        self._stop_if_spent(trainer, self.progress)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        samples, tokens = count_batch(trainer, pl_module, batch)
        self.progress.samples += samples
        self.progress.tokens += tokens
        self.due, self.due_callbacks = set(), []
        self.stepping = not trainer.fit_loop._should_accumulate()
        if self.stepping:
            self._decide(trainer, optimizer_steps_in_batch(pl_module))
        if self.validate_every is not None:
            trainer.val_check_batch = 1 if "validate" in self.due else NEVER
        if self.log_every is not None:
            trainer.log_every_n_steps = 1 if "log" in self.due else NEVER

    def _decide(self, trainer: Trainer, steps: int) -> None:
        self.progress.steps = trainer.global_step + steps
        self.progress.seconds = self._elapsed(trainer)
        before, self.decided = self.decided, replace(self.progress)
        self.history.append(self.decided)
        periods = {"validate": self.validate_every, "checkpoint": self.checkpoint_every, "log": self.log_every}
        self.due = {name for name, period in periods.items() if period and period.crossed(before, self.progress)}
        self.due_callbacks = [
            callback
            for callback in trainer.callbacks
            if isinstance(callback, Periodic) and callback.every.crossed(before, self.progress)
        ]

    def _elapsed(self, trainer: Trainer) -> float:
        """Training seconds so far; when they decide something, as the first process measures them, so that
        every process decides alike."""
        seconds = self.seconds_before + self.clock() - self.started
        return trainer.strategy.broadcast(seconds) if self.time_decides and trainer.world_size > 1 else seconds

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/tokens_seen", float(self.progress.tokens))
        if not self.stepping:
            return
        if "checkpoint" in self.due:
            if "validate" in self.due:
                self.checkpoint_after_validation = True
            else:
                self._save_last(trainer)
        for callback in self.due_callbacks:
            callback.on_period(trainer, pl_module)
        now = self.progress
        if any(budget.unit == "seconds" for budget in self.budgets):
            now = replace(self.progress, seconds=self._elapsed(trainer))
        self._stop_if_spent(trainer, now)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.validated_at = trainer.global_step
        if self.checkpoint_after_validation:
            self.checkpoint_after_validation = False
            self._save_last(trainer)

    def _save_last(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(last_checkpoint_path(trainer))

    def _stop_if_spent(self, trainer: Trainer, progress: Progress) -> None:
        spent = next((budget for budget in self.budgets if budget.reached(progress)), None)
        if spent is None or trainer.should_stop:
            return
        trainer.should_stop = True
        rank_zero_info(
            f"loop.stop_at {spent} reached at step {progress.steps}: {progress.samples:,} samples, "
            f"{progress.tokens:,} tokens, {format_duration(progress.seconds)} of training"
        )

    def rate(self, unit: str) -> float | None:
        """Units per second over the last ``RATE_WINDOW`` optimizer steps, or None before there are two."""
        if len(self.history) < 2:
            return None
        first, last = self.history[0], self.history[-1]
        seconds = last.seconds - first.seconds
        return (last.get(unit) - first.get(unit)) / seconds if seconds > 0 else None

    def seconds_left(self, trainer: Trainer) -> float | None:
        """Until the first budget to run out (``trainer.max_steps`` included) at the current rates."""
        budgets = [*self.budgets, *([Period(trainer.max_steps, "steps")] if trainer.max_steps > 0 else [])]
        estimates = []
        for budget in budgets:
            rate = 1.0 if budget.unit == "seconds" else self.rate(budget.unit)
            if rate:
                estimates.append(max(0.0, budget.amount - self.progress.get(budget.unit)) / rate)
        return min(estimates) if estimates else None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """The training tokens at the saved step, at the top level, where exports read them."""
        checkpoint["tokens_seen"] = self.decided.tokens

    def state_dict(self) -> dict[str, Any]:
        """The counts; when each period next fires follows from them (``Period.crossed``)."""
        progress = self.decided
        return {
            "samples": progress.samples,
            "tokens": progress.tokens,
            "seconds": progress.seconds,
            "validated_at": self.validated_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.progress = Progress(0, state_dict["samples"], state_dict["tokens"], state_dict["seconds"])
        self.validated_at = state_dict["validated_at"]
