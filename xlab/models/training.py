"""What every XLab LightningModule shares: its network built through the family registry, its optimizer
(optimizer.py) and schedule, clear weight mismatches."""

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.families import DEFAULT_IMPLEMENTATION, FAMILIES
from xlab.models.horizon import BudgetHorizon
from xlab.models.optimizer import OptimizerConfig, build_optimizer, group_table, split_parameters
from xlab.models.schedule import WarmupDecay
from xlab.models.sharding import data_parallel_mesh, is_sharded, shard
from xlab.models.transforms import Transform, record, reports


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
        network_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "family": self.family,
                "implementation": implementation,
                "arch": asdict(arch),
                "transforms": record(transforms),
                "optimizer": asdict(optimizer),
                **({"network_options": network_options} if network_options else {}),
            }
        )
        self.arch = arch
        self.optimizer_config = optimizer
        self.model = FAMILIES[self.family].build(arch, implementation, transforms, network_options)
        self.compile = compile
        self._compiled: nn.Module | None = None
        self.horizons: list[BudgetHorizon] = []  # the schedules', when they follow the run's budgets

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
        self.horizons = []
        optimizer = build_optimizer(self.parameter_groups(), config, fused=self._fused_optimizer_allowed())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule(self, share: float = 1.0) -> WarmupDecay:
        """The configured schedule, decaying over ``decay_steps`` or else over the run as its limits end it.

        ``share``: the part of the run's optimizer steps that this schedule's optimizer takes (1 for one
        optimizer; a cycle translator's per-direction optimizers take turns), so that it decays over its own.
        Call it from ``configure_optimizers``, once per optimizer.
        """
        config = self.optimizer_config
        schedule = WarmupDecay(
            config.warmup_steps, math.inf, config.min_lr_ratio, config.schedule, config.decay_fraction
        )
        if config.decay_steps is not None:
            schedule.decay_steps = config.decay_steps * share
            return schedule
        max_steps = self.trainer.estimated_stepping_batches
        if not BudgetHorizon.has_limit(max_steps, self.trainer):
            raise UserError(
                "the run has no step limit: set trainer.max_steps, trainer.max_epochs, loop.stop_at "
                "or model.optimizer.decay_steps"
            )
        horizon = BudgetHorizon(schedule, max_steps, share)
        horizon.update(self.trainer)
        self.horizons.append(horizon)
        return schedule

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (optimizer.py); parameters a transform claims go in the groups it
        gives them, which AdamW steps."""
        claimed = [group for transform in self.model.transforms for group in transform.parameter_groups(self.model)]
        return split_parameters(self.model, self.parameters(), self.optimizer_config, claimed)

    def on_train_start(self) -> None:
        rank_zero_info("Parameter groups:\n" + group_table(self.trainer.optimizers[0]))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Renew the schedule's horizon from the run's budgets (horizon.py) before the step."""
        for horizon in self.horizons:
            horizon.update(self.trainer)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """The trainer's clipping, except for parameter groups with a ``clip`` of their own (a transform's, such as
        a genome's): their gradient norm is clipped to it on its own, and left out of the trainer's."""
        own = [group for group in optimizer.param_groups if group.get("clip") is not None]
        if not own:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in own:
            torch.nn.utils.clip_grad_norm_(group["params"], group["clip"])
        rest = [p for group in optimizer.param_groups if group.get("clip") is None for p in group["params"]]
        if gradient_clip_val and gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(rest, gradient_clip_val)
        elif gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(rest, gradient_clip_val)

    def on_fit_start(self) -> None:
        for line in reports(self.model):
            rank_zero_info(line)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each transform's report (a genome's compression counts) beside the weights, by transform name."""
        if recorded := {t.name: report for t in self.model.transforms if (report := t.report(self.model))}:
            checkpoint["transform_reports"] = recorded

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
