"""``DirectionAdapters``: one LoRA adapter per translation direction on a shared base, through PEFT.

PEFT's ``inject_adapter_in_model`` adds named LoRA adapters to any ``nn.Module`` by the names of
its linear layers (XLab's ``q_proj``, ``kv_proj``, ``out_proj`` of attention, ``in_proj`` /
``out_proj`` of the MLP), and ``set_adapter`` chooses the one a forward pass uses; PEFT's
``PeftModel`` wrapper, which expects a transformers model, is not needed. The base is frozen
unless ``train_base``.
"""

import copy
import warnings
from typing import Any

from torch import nn

from xlab.errors import UserError
from xlab.models.encoder_decoder import EncoderDecoder
from xlab.models.transforms import Transform, register_transform

TARGETS = ("q_proj", "kv_proj", "out_proj", "in_proj")


@register_transform
class DirectionAdapters(Transform):
    """A LoRA adapter of ``rank`` (scaled by ``alpha`` / ``rank``) on every ``targets`` linear layer, one per
    direction of an ``AdapterModel`` (the ``adapters`` topology). ``train_base``: the base is trained too
    (by both directions' updates); otherwise it stays exactly as initialised or loaded."""

    name = "direction_adapters"

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: tuple[str, ...] = TARGETS,
        train_base: bool = False,
    ):
        if rank < 1 or alpha <= 0 or not 0 <= dropout < 1 or not targets:
            raise UserError("DirectionAdapters needs rank >= 1, alpha > 0, 0 <= dropout < 1 and some targets")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets, self.train_base = tuple(targets), train_base

    def settings(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "train_base": self.train_base,
        }

    def apply(self, network: nn.Module) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        from xlab.models.cycle_networks import AdapterModel

        if not isinstance(network, AdapterModel):
            raise UserError(
                f"DirectionAdapters are for the adapters topology (model.init_args.implementation: adapters), "
                f"not a {network.label}: drop the transform or change the topology"
            )
        config = LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.targets)
        )
        with warnings.catch_warnings():  # PEFT warns that a second adapter is a second adapter
            warnings.simplefilter("ignore", UserWarning)
            for direction in network.directions:
                inject_adapter_in_model(config, network.model, adapter_name=direction)
        network.train_base = self.train_base
        for parameter in network.base_parameters():
            parameter.requires_grad_(self.train_base)
        for direction in network.directions:
            for parameter in network.adapter_parameters(direction):
                parameter.requires_grad_(True)

    def materialize(self, network: nn.Module) -> None:
        raise UserError(
            "a model with an adapter per direction cannot become one plain network: export it without --plain "
            "(xlab.models.cycle_adapters.merged_direction gives one direction as a plain encoder-decoder)"
        )


def activate_adapter(model: nn.Module, direction: str) -> None:
    """Make ``direction``'s adapter the one ``model`` computes with, leaving every ``requires_grad`` as it was
    (PEFT's ``set_adapter`` would also make only the active adapter trainable)."""
    if getattr(model, "active_direction", None) == direction:
        return
    from peft.functional import set_adapter

    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    set_adapter(model, direction)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)
    model.active_direction = direction


def merged_direction(model: EncoderDecoder, direction: str) -> EncoderDecoder:
    """A plain copy of ``model`` (an ``AdapterModel``'s base) with ``direction``'s adapter folded into its
    weights: one direction as an ordinary translator network."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    layers = [(name, module) for name, module in plain.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(adapter_names=[direction])
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, layer.get_base_layer())
    plain.__dict__.pop("active_direction", None)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        plain.__dict__.pop(attribute, None)
    return plain
