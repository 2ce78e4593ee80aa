"""Network transforms: recorded in checkpoints and exports, rebuilt on load, materialised into plain networks,
with parameter groups of their own. A test-only transform stands in for the genomic bottleneck and adapters."""

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from tests.conftest import run_cli, tiny_args
from xlab.checkpoint import export, load, read_checkpoint
from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.lm import LanguageModel
from xlab.models.transforms import Transform, from_records, materialize, register_transform


class RowScale(nn.Module):
    """A weight times a learned scale per output row."""

    def __init__(self, rows: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((rows, 1), init))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.scale


@register_transform
class ScaledLinears(Transform):
    """Test-only: every linear weight inside the blocks becomes ``original * scale``, a scale per output row."""

    name = "test-scaled-linears"

    def __init__(self, init: float = 1.0, lr: float | None = None):
        self.init, self.lr = init, lr

    def settings(self) -> dict:
        return {"init": self.init, "lr": self.lr}

    def apply(self, network: nn.Module) -> None:
        for module in network.blocks.modules():
            if isinstance(module, nn.Linear):
                parametrize.register_parametrization(module, "weight", RowScale(module.out_features, self.init))

    def materialize(self, network: nn.Module) -> None:
        for module in network.blocks.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    def parameter_groups(self, network: nn.Module) -> list[dict]:
        if self.lr is None:
            return []
        scales = [p for name, p in network.named_parameters() if name.endswith(".scale")]
        return [{"params": scales, "lr": self.lr, "weight_decay": 0.0, "name": "scales"}]


TRANSFORM = "--model.init_args.transforms=[{class_path: tests.test_transforms.ScaledLinears, init_args: {init: 0.5}}]"
LR_GROUP = "--model.init_args.transforms=[{class_path: tests.test_transforms.ScaledLinears, init_args: {lr: 0.05}}]"


def scales(model: nn.Module) -> list[Tensor]:
    return [p for name, p in model.named_parameters() if name.endswith(".scale")]


@pytest.fixture
def trained(in_tmp: Path, corpus: Path) -> Path:
    """A tiny language model trained with ScaledLinears (the scales move away from their 0.5)."""
    assert run_cli("fit", *tiny_args(corpus, TRANSFORM)) == 0
    return in_tmp / "runs" / "defaults" / "checkpoints" / "last.ckpt"


def test_a_transformed_network_round_trips_through_checkpoint_export_and_materialisation(trained: Path):
    hparams = read_checkpoint(trained)["hyper_parameters"]
    assert hparams["transforms"] == [{"name": "test-scaled-linears", "settings": {"init": 0.5, "lr": None}}]
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = load(trained)
    trained_scales = scales(loaded.model)
    # q, kv, out, MLP in and out in each of 2 blocks
    assert len(trained_scales) == 2 * 5 and not all(torch.all(s == 0.5) for s in trained_scales)
    with torch.no_grad():
        reference = loaded.model.eval()(tokens)
        exported = load(export(trained, trained.with_name("model.safetensors")))
        assert [t.name for t in exported.model.transforms] == ["test-scaled-linears"]
        assert torch.equal(exported.model.eval()(tokens), reference)
        plain = load(export(trained, trained.with_name("plain.safetensors"), plain=True))
        assert plain.model.transforms == [] and scales(plain.model) == []
        assert not any(parametrize.is_parametrized(m) for m in plain.model.modules())
        torch.testing.assert_close(plain.model.eval()(tokens), reference, rtol=1e-6, atol=1e-6)


def test_materialising_in_place_keeps_the_function(trained: Path):
    model = load(trained).model.eval()
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens)
        after = materialize(model)(tokens)
    assert model.transforms == [] and "blocks.0.mlp.in_proj.weight" in model.state_dict()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_validate_rebuilds_the_transforms_from_the_checkpoint_not_the_yaml(trained: Path, corpus: Path, capsys):
    capsys.readouterr()
    assert run_cli("validate", *tiny_args(corpus), f"--ckpt_path={trained}") == 0
    assert "val/loss" in capsys.readouterr().out


def test_a_transform_gives_its_parameters_their_own_learning_rate(in_tmp: Path, corpus: Path):
    model = LanguageModel(TransformerConfig(vocab_size=50, context_length=8), transforms=[ScaledLinears(lr=0.05)])
    groups = {group["name"]: group for group in model.parameter_groups()}
    assert groups["scales"]["lr"] == 0.05 and groups["scales"]["weight_decay"] == 0.0
    grouped = [id(p) for group in groups.values() for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    assert {id(p) for p in groups["scales"]["params"]} == {id(p) for p in scales(model.model)}

    assert run_cli("fit", *tiny_args(corpus, LR_GROUP, "--trainer.log_every_n_steps=1")) == 0
    events = EventAccumulator(str(in_tmp / "runs" / "defaults"))
    events.Reload()
    matrices, own = (events.Scalars(f"lr-AdamW/{name}") for name in ("matrices", "scales"))
    assert len(own) == len(matrices) >= 5
    for ours, base in zip(own, matrices, strict=True):  # the schedule scales both; their ratio stays that of the peaks
        assert ours.value == pytest.approx(base.value * 0.05 / 3e-3, rel=1e-5)


def test_an_unknown_transform_is_one_clear_error():
    with pytest.raises(UserError, match="uses the transform 'nope', which this XLab lacks"):
        from_records([{"name": "nope", "settings": {}}], "model.ckpt")
