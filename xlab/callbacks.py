"""Callbacks: throughput logging, a Ctrl-C that leaves a resumable checkpoint, sample text in TensorBoard."""

import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from xlab.errors import UserError
from xlab.generation import GenerationConfig, generate


class TokensPerSecond(Callback):
    """Logs ``train/tokens_per_sec``: tokens of all processes over the wall time of the last ``window`` steps.

    Wall time between consecutive batch ends, so data loading counts and validation does not.
    """

    def __init__(self, window: int = 20):
        self.window: deque[tuple[int, float]] = deque(maxlen=window)
        self.last: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.window.append((pl_module.tokens_in_batch(batch) * trainer.world_size, now - self.last))
        self.last = now
        if self.window:
            tokens, seconds = map(sum, zip(*self.window))
            pl_module.log("train/tokens_per_sec", tokens / seconds)


class SaveOnInterrupt(Callback):
    """The first Ctrl-C ends training after the current step and leaves ``last.ckpt``; a second aborts at once.

    All processes agree on the stop at the same step, so the checkpoint is consistent under DDP.
    """

    def __init__(self):
        self.requested = False
        self.saved_to: Path | None = None
        self.previous_handler: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.requested:
            self._restore_handler()
            raise KeyboardInterrupt
        self.requested = True

    def _restore_handler(self) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save after every other callback is done, so nothing writes over or beside this checkpoint."""
        self._restore_handler()
        if not trainer.should_stop or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        checkpoint = trainer.checkpoint_callback
        directory = Path(checkpoint.dirpath) if checkpoint else Path(trainer.default_root_dir)
        self.saved_to = directory / "last.ckpt"
        trainer.save_checkpoint(self.saved_to)


class SampleText(Callback):
    """Every ``every_n_steps`` optimizer steps, continue a few fixed prompts and write them to
    TensorBoard's text tab (tag ``samples``), so a run shows what the model writes as it learns."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_k: int = 40,
        seed: int = 0,
    ):
        if every_n_steps < 1:
            raise UserError(f"SampleText every_n_steps must be at least 1, got {every_n_steps}")
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k, seed=seed
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.write_samples(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step % self.every_n_steps and trainer.is_global_zero:
            self.write_samples(trainer, pl_module)

    def write_samples(self, trainer: Trainer, pl_module: LightningModule) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        was_training = pl_module.training
        pl_module.eval()
        results = generate(pl_module.model, trainer.datamodule.tokenizer, self.prompts, self.config)
        pl_module.train(was_training)
        # Indented lines are a code block in TensorBoard's markdown, which keeps the model's line breaks.
        text = "\n\n".join(
            "    " + (prompt + generations[0].text).replace("\n", "\n    ")
            for prompt, generations in zip(self.prompts, results)
        )
        experiment.add_text("samples", text, trainer.global_step)
