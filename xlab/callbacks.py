"""Callbacks: throughput logging, a Ctrl-C that leaves a resumable checkpoint, sample text in TensorBoard,
the decoding engine handed to translators."""

import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from tokenizers import Tokenizer

from xlab.errors import UserError
from xlab.generation import CausalModel, GenerationConfig, best_targets, generate
from xlab.loop import LoopControl, Periodic, last_checkpoint_path
from xlab.models.sharding import whole_weights


class TokensPerSecond(Callback):
    """Logs ``train/tokens_per_sec``: tokens of all processes over the wall time of the last ``window`` steps.

    Wall time between consecutive batch ends, so data loading counts and validation does not. The tokens are
    ``LoopControl``'s count, the exact sum over processes.
    """

    def __init__(self, window: int = 20):
        self.window: deque[tuple[int, float]] = deque(maxlen=window)
        self.last: float | None = None
        self.tokens_at_last = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and LoopControl.of(trainer) is None:
            raise UserError(f"{type(self).__name__} needs xlab.loop.LoopControl among the trainer's callbacks")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now, tokens_seen = time.perf_counter(), LoopControl.of(trainer).progress.tokens
        if self.last is not None:
            self.window.append((tokens_seen - self.tokens_at_last, now - self.last))
        self.last, self.tokens_at_last = now, tokens_seen
        if self.window:
            tokens, seconds = map(sum, zip(*self.window))
            pl_module.log("train/tokens_per_sec", tokens / seconds)


class SaveOnSignal(Callback):
    """On ``signum``, training ends after the current step on every process and leaves ``last.ckpt``.

    All processes agree on the stop at the same step (one small all-reduce per step), so the
    checkpoint is consistent under DDP and a resumed run repeats no step. Subclasses choose the
    signal, whether to listen (``active``) and what the handler does.
    """

    signum: signal.Signals

    def __init__(self):
        self.requested = False
        self.stopping = False
        self.saved_to: Path | None = None
        self.installed = False
        self.previous_handler: Any = None

    def active(self) -> bool:
        return True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.requested, self.stopping, self.saved_to = False, False, None
        if self.active():
            self.previous_handler = signal.signal(self.signum, self.handle)
            self.installed = True

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def restore_handler(self) -> None:
        if self.installed:
            # None: the previous handler was not set from Python
            signal.signal(self.signum, signal.SIG_DFL if self.previous_handler is None else self.previous_handler)
            self.installed = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.installed and trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            self.stopping = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save once training is over, so that no later step writes over or beside this checkpoint."""
        if not self.stopping:
            return
        self.saved_to = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved_to)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.restore_handler()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After Lightning's own signal handling is undone, which may have saved this handler as the one to restore."""
        self.restore_handler()


class SaveOnInterrupt(SaveOnSignal):
    """The first Ctrl-C ends training after the current step and leaves ``last.ckpt``; a second aborts at once."""

    signum = signal.SIGINT

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.restore_handler()
            raise KeyboardInterrupt
        self.requested = True


class SampleText(Periodic):
    """Every ``every`` (a period such as "500 steps", "2M tokens" or "10 min") and at the end of training,
    continue a few fixed prompts and write them to TensorBoard's text tab (tag ``samples``), so a run shows
    what the model writes as it learns."""

    def __init__(
        self,
        prompts: list[str],
        every: str = "500 steps",
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_k: int = 40,
        seed: int = 0,
    ):
        super().__init__(every, "SampleText.every")
        self.prompts = prompts
        self.sampled_at: int | None = None
        self.config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k, seed=seed
        )

    def on_period(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sampled_at = trainer.global_step
        self.write_samples(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.sampled_at != trainer.global_step:
            self.write_samples(trainer, pl_module)

    def write_samples(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every process calls it, since a sharded network gathers its weights on all of them together; the first
        process alone decodes and writes."""
        if not hasattr(getattr(trainer.logger, "experiment", None), "add_text"):
            return
        was_training = pl_module.training
        pl_module.eval()
        with whole_weights(pl_module.model):
            text = self.sample_text(pl_module.model, trainer.datamodule.tokenizer) if trainer.is_global_zero else None
        pl_module.train(was_training)
        if text is not None:
            trainer.logger.experiment.add_text("samples", text, trainer.global_step)

    def sample_text(self, model: CausalModel, tokenizer: Tokenizer) -> str:
        """Each prompt with its continuation, as indented lines: a code block in TensorBoard's markdown, which
        keeps the model's line breaks."""
        results = generate(model, tokenizer, self.prompts, self.config)
        return "\n\n".join(
            "    " + (prompt + generations[0].text).replace("\n", "\n    ")
            for prompt, generations in zip(self.prompts, results)
        )


class EngineDecoding(Callback):
    """Hands ``xlab.generation``'s decoding to a module that takes one (``use_decoder``, as the Translator has)
    before it validates, tests or predicts.

    The models do not import the engine (it decodes them through its Protocols); this callback
    is where the two meet. Modules without ``use_decoder`` are left alone.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        use_decoder = getattr(pl_module, "use_decoder", None)
        if use_decoder is not None:
            use_decoder(best_targets)
