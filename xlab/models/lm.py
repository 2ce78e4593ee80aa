"""The language-model LightningModule: next-token loss and metrics (optimizer and schedule: training.py)."""

from collections.abc import Sequence

from torch import Tensor, nn

from xlab.models.config import TransformerConfig
from xlab.models.losses import next_token_loss
from xlab.models.metrics import LMMetrics, bits_per_byte, token_accuracy, token_statistics
from xlab.models.optimizer import OptimizerConfig
from xlab.models.training import TrainingModule
from xlab.models.transforms import Transform

__all__ = ["LanguageModel", "OptimizerConfig"]


class LanguageModel(TrainingModule):
    """A decoder-only transformer trained to predict the next token."""

    family = "lm"

    def __init__(
        self,
        arch: TransformerConfig,
        optimizer: OptimizerConfig = OptimizerConfig(),
        transforms: Sequence[Transform] = (),
        compile: bool = False,
    ):
        super().__init__(arch, optimizer, transforms, compile=compile)
        self.metrics = nn.ModuleDict({stage: LMMetrics() for stage in ("val", "test")})

    def forward(self, tokens: Tensor) -> Tensor:
        return self.network(tokens)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input"])
        loss = next_token_loss(logits, batch["target"])
        self.log("train/loss", loss, prog_bar=True)
        if self.logs_this_step():
            self.log("train/accuracy", token_accuracy(logits, batch["target"]))
            loss_sum = loss.detach() * batch["target"].numel()
            self.log("train/bits_per_byte", bits_per_byte(loss_sum, batch["target_bytes"].sum()))
        return loss

    def tokens_in_batch(self, batch: dict[str, Tensor]) -> int:
        """Tokens this process trains on in ``batch``."""
        return batch["input"].numel()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict[str, Tensor]) -> None:
        stats = token_statistics(self(batch["input"]), batch["target"])
        self.metrics[stage].update(stats, batch["target_bytes"].sum())

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        metrics = self.metrics[stage]
        values = metrics.compute()
        metrics.reset()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=stage == "val")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per-sequence mean loss (nats per token) and bits per byte of the predict split."""
        logits = self(batch["input"]).float()
        losses = nn.functional.cross_entropy(logits.transpose(1, 2), batch["target"], reduction="none")
        return {"loss": losses.mean(1), "bits_per_byte": bits_per_byte(losses.sum(1), batch["target_bytes"])}
