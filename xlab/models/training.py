"""What every XLab LightningModule shares: its network built through the family registry, AdamW and its
schedule, clear weight mismatches."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.families import DEFAULT_IMPLEMENTATION, FAMILIES
from xlab.models.schedule import WarmupCosine
from xlab.models.sharding import data_parallel_mesh, is_sharded, shard
from xlab.models.transforms import Transform, record


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


class TrainingModule(LightningModule):
    """The network, optimizer, schedule and checkpoint hooks of every model family.

    ``family`` names the subclass's entry in ``xlab.models.families``; the network is built
    there, with ``transforms`` applied, and the hyperparameters record all a loader needs to
    build it again (family, implementation, architecture, transforms). With ``compile``, training
    and evaluation run the network through ``torch.compile`` (``network``); generation stays eager,
    since each decoding step grows the KV cache by one position, a new shape to compile for.
    """

    family: ClassVar[str]

    def __init__(
        self,
        arch: TransformerConfig,
        optimizer: OptimizerConfig,
        transforms: Sequence[Transform] = (),
        implementation: str = DEFAULT_IMPLEMENTATION,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "family": self.family,
                "implementation": implementation,
                "arch": asdict(arch),
                "transforms": record(transforms),
                "optimizer": asdict(optimizer),
            }
        )
        self.arch = arch
        self.optimizer_config = optimizer
        self.model = FAMILIES[self.family].build(arch, implementation, transforms)
        self.compile = compile
        self._compiled: nn.Module | None = None

    @property
    def network(self) -> nn.Module:
        """What training and evaluation call: ``model``, compiled once ``configure_model`` has run with ``compile``."""
        return self.model if self._compiled is None else self._compiled

    def configure_model(self) -> None:
        """Lightning's hook for changes to the network once the strategy is set up and before the optimizer:
        sharding under ``ModelParallelStrategy`` (FSDP2), then compiling."""
        if self.device_mesh is not None and not is_sharded(self.model):
            shard(self.model, data_parallel_mesh(self.device_mesh))
        if self.compile and self._compiled is None:
            # outside the module tree, so that state dicts and checkpoints name only ``model``'s parameters
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def logs_this_step(self) -> bool:
        """Whether this training step's metrics reach the loggers (Lightning's own test, which its
        LearningRateMonitor uses too), so that a figure costing a pass over the logits is computed only then."""
        return self._trainer is None or self._trainer._logger_connector.should_update_logs

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        optimizer = torch.optim.AdamW(
            self.parameter_groups(),
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

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only; parameters a transform claims go in the groups it gives them."""
        claimed = [group for transform in self.model.transforms for group in transform.parameter_groups(self.model)]
        owned = {id(parameter) for group in claimed for parameter in group["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in owned]
        decay = self.optimizer_config.weight_decay
        return [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": decay, "name": "matrices"},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "name": "norms_biases"},
            *claimed,
        ]

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
