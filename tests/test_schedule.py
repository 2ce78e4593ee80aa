"""Warm-up + cosine or trapezoid learning-rate schedules, and the optimizer LanguageModel builds around them."""

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.lm import LanguageModel, OptimizerConfig
from xlab.models.schedule import WarmupDecay

WARMUP, DECAY, FLOOR = 10, 110, 0.2


@pytest.fixture
def schedule():
    return WarmupDecay(warmup_steps=WARMUP, decay_steps=DECAY, floor=FLOOR)


def test_warmup_is_linear_from_the_first_step(schedule):
    assert schedule(0) == pytest.approx(1 / WARMUP)
    for step in range(WARMUP):
        assert schedule(step) == pytest.approx((step + 1) / WARMUP)


def test_peak_at_the_end_of_warmup(schedule):
    assert schedule(WARMUP - 1) == 1.0
    assert schedule(WARMUP) == 1.0


def test_halfway_through_decay_is_halfway_to_the_floor(schedule):
    midpoint = WARMUP + (DECAY - WARMUP) // 2
    assert schedule(midpoint) == pytest.approx(FLOOR + (1 - FLOOR) / 2, abs=1e-12)


def test_cosine_shape_between_warmup_and_decay(schedule):
    for step in range(WARMUP, DECAY + 1):
        progress = (step - WARMUP) / (DECAY - WARMUP)
        expected = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        assert schedule(step) == pytest.approx(expected, abs=1e-12)


def test_floor_is_reached_exactly_and_kept(schedule):
    assert schedule(DECAY) == FLOOR
    for step in (DECAY + 1, DECAY + 7, 2 * DECAY, 10**7):
        assert schedule(step) == FLOOR


def test_decreases_monotonically_after_warmup(schedule):
    values = [schedule(step) for step in range(WARMUP, DECAY + 1)]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))
    assert all(FLOOR <= value <= 1.0 for value in values)


def test_no_warmup_starts_at_the_peak():
    schedule = WarmupDecay(warmup_steps=0, decay_steps=100, floor=0.0)
    assert schedule(0) == 1.0
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(100) == 0.0


def test_trapezoid_holds_the_peak_then_falls_linearly_over_the_last_fraction():
    trapezoid = WarmupDecay(warmup_steps=WARMUP, decay_steps=DECAY, floor=FLOOR, shape="trapezoid", decay_fraction=0.2)
    start = DECAY - 0.2 * DECAY  # 88
    assert trapezoid(0) == pytest.approx(1 / WARMUP)
    assert all(trapezoid(step) == 1.0 for step in range(WARMUP, int(start) + 1))
    for step in range(int(start), DECAY + 1):
        assert trapezoid(step) == pytest.approx(FLOOR + (1 - FLOOR) * (DECAY - step) / (DECAY - start), abs=1e-12)
    assert trapezoid(DECAY) == FLOOR and trapezoid(10 * DECAY) == FLOOR


def test_trapezoid_decay_never_starts_before_warmup_ends():
    trapezoid = WarmupDecay(warmup_steps=WARMUP, decay_steps=DECAY, floor=0.0, shape="trapezoid", decay_fraction=1.0)
    assert trapezoid(WARMUP) == 1.0
    assert trapezoid((WARMUP + DECAY) // 2) == pytest.approx(0.5)


def test_an_unknown_horizon_holds_the_peak_after_warmup():
    for shape in ("cosine", "trapezoid"):
        assert WarmupDecay(warmup_steps=2, decay_steps=math.inf, floor=FLOOR, shape=shape)(1000) == 1.0


def test_lambda_lr_follows_the_schedule(schedule):
    """Inside LambdaLR the optimizer's lr at each step is peak * schedule(step)."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    seen = []
    for step in range(DECAY + 20):
        seen.append(optimizer.param_groups[0]["lr"])
        assert seen[-1] == pytest.approx(0.5 * schedule(step), abs=1e-12), step
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    assert max(seen) == pytest.approx(0.5)
    assert seen[-1] == pytest.approx(0.5 * FLOOR)


# ----------------------------------------------------------------------------------------------
# LanguageModel.configure_optimizers


def make_lm(bias=True, norm="layernorm", tie=True, positions="learned", **optimizer):
    arch = TransformerConfig(
        vocab_size=50,
        context_length=8,
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_ff=32,
        bias=bias,
        norm=norm,
        tie_embeddings=tie,
        positions=positions,
    )
    options = dict(lr=1e-3, weight_decay=0.1, warmup_steps=4, decay_steps=40, min_lr_ratio=0.1)
    options.update(optimizer)
    return LanguageModel(arch=arch, optimizer=OptimizerConfig(**options))


@pytest.mark.parametrize(
    "bias,norm,tie,positions",
    [
        (True, "layernorm", True, "learned"),
        (False, "layernorm", False, "sinusoidal"),
        (True, "rmsnorm", False, "rotary"),
        (False, "rmsnorm", True, "learned"),
    ],
)
def test_weight_decay_only_on_matrices(bias, norm, tie, positions):
    model = make_lm(bias=bias, norm=norm, tie=tie, positions=positions)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}  # tied tensors appear once
    groups = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            groups.setdefault(id(p), []).append(group["weight_decay"])
    # every trainable parameter in exactly one group, nothing else
    assert set(groups) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(len(decays) == 1 for decays in groups.values())
    decayed = {names[i] for i, (wd,) in groups.items() if wd > 0}
    for i, (wd,) in groups.items():
        name = names[i]
        if "norm" in name or name.endswith("bias"):
            assert wd == 0.0, name
        else:
            assert wd == 0.1, name
    expected = {"model.embed.weight"} | {
        f"model.blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.kv_proj", "self_attn.out_proj", "mlp.in_proj", "mlp.out_proj")
    }
    if positions == "learned":
        expected.add("model.positions.table.weight")
    if not tie:
        expected.add("model.head.weight")
    assert decayed == expected


def test_optimizer_settings_and_schedule_are_applied():
    model = make_lm(lr=2e-3, betas=(0.8, 0.9), eps=1e-6, warmup_steps=4, decay_steps=40, min_lr_ratio=0.1)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-3 / 4)
    assert lrs[3] == pytest.approx(2e-3)
    assert lrs[40] == pytest.approx(2e-4) and lrs[49] == pytest.approx(2e-4)
    # both groups share the schedule
    assert optimizer.param_groups[1]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_decay_steps_default_to_the_run_length():
    """Without decay_steps the cosine reaches its floor at the last of the trainer's estimated 21 steps."""
    model = make_lm(decay_steps=None, warmup_steps=0, min_lr_ratio=0.25)
    model.trainer = SimpleNamespace(estimated_stepping_batches=21, precision_plugin=None, callbacks=[])
    config = model.configure_optimizers()
    schedule = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert schedule(10) == pytest.approx(0.25 + 0.75 / 2)
    assert schedule(20) == 0.25
    assert schedule(19) > 0.25


def test_unbounded_run_without_decay_steps_is_a_user_error():
    model = make_lm(decay_steps=None)
    model.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"), precision_plugin=None, callbacks=[])
    with pytest.raises(UserError, match="loop.stop_at or model.optimizer.decay_steps"):
        model.configure_optimizers()


@pytest.mark.parametrize("mixed", [False, True])
def test_fused_adamw_unless_lightning_mixed_precision_would_refuse_clipping(mixed):
    model = make_lm()
    plugin = MixedPrecision("bf16-mixed", "cpu") if mixed else None
    model.trainer = SimpleNamespace(estimated_stepping_batches=20, precision_plugin=plugin, callbacks=[])
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is (not mixed)


@pytest.mark.parametrize(
    "options",
    [dict(lr=0.0), dict(warmup_steps=-1), dict(min_lr_ratio=1.5), dict(muon_lr=0.0), dict(decay_fraction=0.0)],
)
def test_optimizer_config_validation(options):
    with pytest.raises(UserError):
        OptimizerConfig(**options)
