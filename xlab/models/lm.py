"""The language-model LightningModule: next-token loss, metrics, optimizer and schedule."""

from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.metrics import LMMetrics, bits_per_byte, token_statistics
from xlab.models.schedule import WarmupCosine


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay on weight matrices only, and a warm-up + cosine schedule.

    ``decay_steps`` defaults to the run's total optimizer steps; the rate ends at
    ``min_lr_ratio`` times ``lr``.
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("model.optimizer needs lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


class LanguageModel(LightningModule):
    """A decoder-only transformer trained to predict the next token."""

    def __init__(self, arch: TransformerConfig, optimizer: OptimizerConfig = OptimizerConfig()):
        super().__init__()
        self.save_hyperparameters({"arch": asdict(arch), "optimizer": asdict(optimizer)})
        self.arch = arch
        self.optimizer_config = optimizer
        self.model = Decoder(arch)
        self.metrics = nn.ModuleDict({stage: LMMetrics() for stage in ("val", "test")})
        self.tokens_seen = 0

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        stats = token_statistics(self(batch["input"]), batch["target"])
        tokens = stats["tokens"].clamp(min=1).float()
        loss = stats["loss_sum"] / tokens
        self.tokens_seen += batch["input"].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", stats["correct"] / tokens)
        self.log("train/bits_per_byte", bits_per_byte(stats["loss_sum"].detach(), batch["target_bytes"].sum()))
        self.log("train/tokens_seen", float(self.tokens_seen))
        return loss

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

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay, "name": "matrices"},
                {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases"},
            ],
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            fused=self._fused_optimizer_allowed(),
        )
        decay_steps = config.decay_steps or self.trainer.estimated_stepping_batches
        if decay_steps == float("inf"):
            raise UserError(
                "the run has no step limit: set trainer.max_steps, trainer.max_epochs or model.optimizer.decay_steps"
            )
        schedule = WarmupCosine(config.warmup_steps, int(decay_steps), config.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_optimizer_allowed(self) -> bool:
        """The fused AdamW kernel (about 3x faster steps) unless Lightning's mixed-precision plugin is in use:
        it refuses gradient clipping with optimizers that unscale gradients themselves, as fused ones do."""
        return self._trainer is None or not isinstance(self._trainer.precision_plugin, MixedPrecision)

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            detail = str(error).splitlines()[-1].strip()
            raise UserError(
                f"the checkpoint's weights do not fit the configured model ({detail}): "
                "use the model and data settings it was trained with"
            ) from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
