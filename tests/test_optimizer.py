"""The optimizer factory: Muon for the hidden matrices and AdamW for the rest, as one optimizer that steps,
schedules, logs, checkpoints and resumes like AdamW alone."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from torch import nn
from torch.utils.data import DataLoader

from tests.test_horizon import batches as lm_batches
from tests.test_loop import Recording
from tests.test_transforms import ScaledLinears
from xlab.models.config import TransformerConfig
from xlab.models.lm import LanguageModel
from xlab.models.optimizer import MUON_GROUP, Muon, MuonWithAdamW, OptimizerConfig, group_table, newton_schulz
from xlab.models.translator import Translator

MUON = {"name": "muon", "lr": 1e-3, "muon_lr": 0.05, "warmup_steps": 0, "decay_steps": 10}


def arch(**options) -> TransformerConfig:
    settings = {"vocab_size": 50, "context_length": 8, "n_layers": 2, "d_model": 16, "n_heads": 2, "d_ff": 32}
    return TransformerConfig(**{**settings, **options})


def configured(module):
    module.trainer = SimpleNamespace(estimated_stepping_batches=10, precision_plugin=None, callbacks=[])
    return module.configure_optimizers()


MODULES = {
    "lm-tied": lambda: LanguageModel(arch(), OptimizerConfig(**MUON)),
    "lm-untied-rotary": lambda: LanguageModel(arch(tie_embeddings=False, positions="rotary"), OptimizerConfig(**MUON)),
    "lm-transform": lambda: LanguageModel(arch(), OptimizerConfig(**MUON), transforms=[ScaledLinears(lr=0.05)]),
    "translator": lambda: Translator(arch(), OptimizerConfig(**MUON)),
    "translator-torch": lambda: Translator(arch(), OptimizerConfig(**MUON), implementation="torch"),
}


@pytest.mark.parametrize("name", MODULES)
def test_muon_and_adamw_groups_are_disjoint_and_cover_every_trainable_parameter(name: str):
    module = MODULES[name]()
    optimizer = configured(module)["optimizer"]
    assert isinstance(optimizer, MuonWithAdamW)
    muon = [id(p) for group in optimizer.muon.param_groups for p in group["params"]]
    adamw = [id(p) for group in optimizer.adamw.param_groups for p in group["params"]]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert len(muon) + len(adamw) == len(trainable) and set(muon) | set(adamw) == trainable
    names = {id(p): n for n, p in module.named_parameters()}
    parameters = dict(module.named_parameters())
    for i in muon:  # inside the blocks, 2-D; never an embedding table, the head or a transform's scale
        assert names[i].startswith(("model.blocks.", "model.encoder.", "model.decoder.", "model.transformer."))
        assert dict(module.named_parameters())[names[i]].dim() == 2 and not names[i].endswith(".scale")
    outside = {names[i] for i in adamw if parameters[names[i]].dim() == 2 and not names[i].endswith(".scale")}
    assert {"model.embed.weight"} <= outside and all("blocks" not in n and "coder." not in n for n in outside)
    assert [g["name"] for g in optimizer.param_groups][-1] == MUON_GROUP


def test_transform_groups_go_to_adamw_with_their_own_rate():
    optimizer = configured(MODULES["lm-transform"]())["optimizer"]
    scales = next(group for group in optimizer.adamw.param_groups if group["name"] == "scales")
    assert scales["lr"] == 0.05 and scales["weight_decay"] == 0.0


def test_each_group_gets_its_own_rate_and_the_same_schedule():
    config = configured(LanguageModel(arch(), OptimizerConfig(**{**MUON, "warmup_steps": 4, "decay_steps": 12})))
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(14):
        rates.append({group["name"]: group["lr"] for group in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    for step_rates in rates:
        assert step_rates[MUON_GROUP] / step_rates["embeddings_head"] == pytest.approx(0.05 / 1e-3)
    assert rates[3][MUON_GROUP] == pytest.approx(0.05) and rates[12][MUON_GROUP] == pytest.approx(0.005)


def loss_of(module: LanguageModel) -> torch.Tensor:
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    return module(tokens).logsumexp(-1).mean() - module(tokens)[..., 3].mean()


def test_muon_updates_hidden_matrices_orthogonally_and_adamw_the_rest_as_adamw_alone():
    """One step: each hidden matrix moves by lr * sqrt(max(1, rows/cols)) times an orthogonalised gradient
    (the singular values of the update near 1 after five Newton-Schulz steps, where the gradient's spread
    widely); the embedding moves
    exactly as a plain AdamW with the same settings moves it."""
    torch.manual_seed(0)
    module = LanguageModel(arch(), OptimizerConfig(**MUON, weight_decay=0.0))
    optimizer = configured(module)["optimizer"]
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    loss_of(module).backward()
    gradients = {name: p.grad.clone() for name, p in module.named_parameters()}
    reference = torch.optim.AdamW([before["model.embed.weight"].clone().requires_grad_()], lr=1e-3, weight_decay=0.0)
    reference.param_groups[0]["params"][0].grad = gradients["model.embed.weight"]
    reference.step()
    optimizer.step()
    after = dict(module.named_parameters())
    torch.testing.assert_close(after["model.embed.weight"], reference.param_groups[0]["params"][0])
    for name in ("model.blocks.0.self_attn.q_proj.weight", "model.blocks.1.mlp.in_proj.weight"):
        rows, cols = before[name].shape
        update = (before[name] - after[name].detach()) / (0.05 * max(1, rows / cols) ** 0.5)
        # LayerNorm's outputs have zero mean, so a gradient may lack a direction: compare the ones it has.
        spread = torch.linalg.svdvals(gradients[name])
        rank = int((spread > 1e-3 * spread.max()).sum())
        singular = torch.linalg.svdvals(update)[:rank]
        assert rank >= min(rows, cols) - 1 and spread[0] / spread[rank - 1] > 5  # far from orthogonal
        assert singular.min() > 0.5 and singular.max() < 1.3, (name, singular)


def one_muon_step(precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 24x40 matrix, its gradient, and the matrix after one Muon step at lr 0.1 in ``precision``."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator)
    gradient = torch.randn(24, 40, generator=generator) * torch.logspace(0, -2, 40)  # far from orthogonal
    parameter = nn.Parameter(weight.clone())
    parameter.grad = gradient.clone()
    Muon([parameter], precision=precision, lr=0.1, weight_decay=0.0).step()
    return weight, gradient, parameter.detach()


def test_muon_in_float32_is_torchs_step_with_the_same_iteration_in_float32():
    """The float32 step is torch's (Nesterov momentum from a zero buffer, then the orthogonalised update) with
    ``newton_schulz`` in float32; torch's own bfloat16 step differs from it by bfloat16 rounding only; ``auto``
    on a CPU is the float32 step; torch's function is back in place afterwards."""
    weight, gradient, fp32 = one_muon_step("fp32")
    momentum = gradient.lerp(gradient * 0.05, 0.95)  # Nesterov: grad.lerp(buffer, momentum), buffer 0.05 grad
    expected = weight - 0.1 * newton_schulz(momentum, (3.4445, -4.775, 2.0315), 5, 1e-7)
    torch.testing.assert_close(fp32, expected, rtol=1e-5, atol=1e-6)
    _, _, bf16 = one_muon_step("bf16")
    gap = ((bf16 - fp32).norm() / (fp32 - weight).norm()).item()
    assert 1e-4 < gap < 0.05, gap  # the same iteration, rounded to bfloat16's 8 bits
    torch.testing.assert_close(one_muon_step("auto")[2], fp32, rtol=0, atol=0)
    assert torch.optim._muon._zeropower_via_newtonschulz.__module__ == "torch.optim._muon"  # torch's, restored


def test_group_table_names_each_optimizer_group_and_rate():
    table = group_table(configured(LanguageModel(arch(), OptimizerConfig(**MUON)))["optimizer"]).splitlines()
    assert table[0].split() == ["optimizer", "group", "tensors", "parameters", "peak", "lr", "weight", "decay"]
    rows = {line.split()[1]: line.split() for line in table[1:]}
    assert rows[MUON_GROUP][0] == "muon" and rows[MUON_GROUP][4] == "0.05"
    assert rows["embeddings_head"][0] == rows["norms_biases"][0] == "adamw" and rows["norms_biases"][4] == "0.001"
    assert int(rows[MUON_GROUP][2]) == 2 * 5  # per block: q, kv and out projections, the MLP in and out
    assert sum(int(row[3].replace(",", "")) for row in rows.values()) == sum(
        p.numel() for p in LanguageModel(arch()).parameters()
    )


def test_adamw_alone_keeps_its_groups():
    optimizer = configured(LanguageModel(arch()))["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert [group["name"] for group in optimizer.param_groups] == ["matrices", "norms_biases"]


def fit_lm(root: Path, max_steps: int, ckpt_path: Path | None = None) -> tuple[LanguageModel, list[Recording]]:
    """A tiny Muon-trained LM for ``max_steps`` with gradient clipping, saved to root/last.ckpt; the module and
    the rate logs. Every batch is the same one, so where a resumed run picks up the data cannot matter."""
    torch.manual_seed(0)
    module = LanguageModel(arch(), OptimizerConfig(name="muon", lr=3e-3, muon_lr=0.03, warmup_steps=2, decay_steps=10))
    loggers = [Recording(f"lr-MuonWithAdamW/{group}") for group in (MUON_GROUP, "embeddings_head")]
    trainer = Trainer(
        max_steps=max_steps,
        gradient_clip_val=1.0,
        callbacks=[LearningRateMonitor("step")],
        logger=loggers,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=DataLoader(lm_batches(1) * 5, batch_size=None), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return module, loggers


def test_resume_with_muon_is_exact_and_logs_a_rate_per_group(tmp_path: Path):
    """Five steps, then five more from the checkpoint, end with the weights of ten at once: Muon's momentum and
    AdamW's moments both come back from the checkpoint. Each group's rate is logged, the ratio of the peaks."""
    straight, loggers = fit_lm(tmp_path / "straight", 10)
    fit_lm(tmp_path / "resumed", 5)
    checkpoint = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert any("momentum_buffer" in state for state in checkpoint["optimizer_states"][0]["state"].values())
    resumed, _ = fit_lm(tmp_path / "resumed", 10, ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert resumed.trainer.global_step == straight.trainer.global_step == 10
    for (name, tensor), other in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(other, tensor, rtol=0, atol=1e-6, msg=name)
    muon, adamw = loggers
    assert len(muon.values) == len(adamw.values) == 10
    for ours, base in zip(muon.values, adamw.values):
        assert ours == pytest.approx(base * 0.03 / 3e-3, rel=1e-5)
