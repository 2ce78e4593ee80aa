"""Loop control: period parsing, when periods fire (counted tokens, a fake clock), budgets, resume and the CSV."""

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import run_cli, tiny_args
from xlab.callbacks import SaveOnInterrupt
from xlab.errors import UserError
from xlab.loop import LoopControl, LoopRichProgressBar, MetricsCSV, Period, Periodic
from xlab.models import lm
from xlab.models.metrics import token_accuracy

# Target tokens (padding excluded) of the six batches of the toy's epoch, two sequences each. Running totals
# over two epochs: 10 13 20 32 37 46 | 56 59 66 78 83 92.
TOKENS = [10, 3, 7, 12, 5, 9]
RUNNING_TOKENS = [10, 13, 20, 32, 37, 46, 56, 59, 66, 78, 83, 92]


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Toy(LightningModule):
    """One weight, padded batches like a translator's, and steps that take ``seconds_per_step`` of a fake clock."""

    def __init__(self, clock: FakeClock | None = None, seconds_per_step: float = 7.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.clock = clock
        self.seconds_per_step = seconds_per_step

    def tokens_in_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["target"] != 0).sum())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.clock is not None:
            self.clock.now += self.seconds_per_step
        self.log("train/weight", self.weight)
        return (self.weight - 1) ** 2

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([padded_batch(tokens) for tokens in TOKENS], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([padded_batch(1)], batch_size=None)


def padded_batch(tokens: int) -> dict[str, torch.Tensor]:
    target = torch.zeros(2, 16, dtype=torch.long)
    target.view(-1)[:tokens] = 1
    return {"source": torch.ones(2, 4, dtype=torch.long), "target": target}


class Recorder(Callback):
    """Validations and checkpoint saves, in order, with the step after which they happened."""

    def __init__(self):
        self.events: list[tuple[str, int]] = []

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.events.append(("validate", trainer.global_step))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.events.append(("save", trainer.global_step))

    @property
    def validated(self) -> list[int]:
        return [step for event, step in self.events if event == "validate"]

    @property
    def saved(self) -> list[int]:
        return [step for event, step in self.events if event == "save"]


class Every(Periodic):
    def __init__(self, every: str):
        super().__init__(every, "Every.every")
        self.fired: list[int] = []

    def on_period(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.fired.append(trainer.global_step)


class Recording(Logger):
    """The steps (Lightning's 0-based logging index) at which ``metric`` reached the logger, and its values."""

    def __init__(self, metric: str = "train/weight"):
        super().__init__()
        self.metric = metric
        self.steps: list[int] = []
        self.values: list[float] = []

    name = "recording"
    version = ""

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.metric in metrics:
            self.steps.append(step)
            self.values.append(metrics[self.metric])


def fit(
    control: LoopControl,
    *callbacks: Callback,
    root: Path,
    max_steps: int = 12,
    model: Toy | None = None,
    ckpt_path: Path | None = None,
) -> tuple[Trainer, Recorder, Recording]:
    """Train the toy under ``control`` (checkpoints go to ``root``): the trainer, what ran when, what was logged."""
    recorder, logger = Recorder(), Recording()
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=[control, recorder, *callbacks],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(model or Toy(), ckpt_path=ckpt_path)
    return trainer, recorder, logger


@pytest.mark.parametrize(
    ("text", "amount", "unit"),
    [
        ("500 steps", 500, "steps"),
        ("1 step", 1, "steps"),
        ("64k samples", 64_000, "samples"),
        ("1M tokens", 1_000_000, "tokens"),
        ("2.5k tokens", 2_500, "tokens"),
        ("1B tokens", 10**9, "tokens"),
        ("90s", 90, "seconds"),
        ("10 min", 600, "seconds"),
        ("2h", 7_200, "seconds"),
        ("1.5 hours", 5_400, "seconds"),
        ("0.5 s", 0.5, "seconds"),
    ],
)
def test_period_parsing(text: str, amount: float, unit: str):
    assert Period.parse(text, "loop.x") == Period(amount, unit, text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0 steps", "it must be more than zero"),
        ("0.0001 tokens", "a number of tokens must be whole"),
        ("1.5 steps", "a number of steps must be whole"),
        ("5 furlongs", "unknown unit 'furlongs'"),
        ("1m tokens", "unknown unit 'm tokens'"),
        ("500", "not a period"),
        ("-3 steps", "not a period"),
        ("", "not a period"),
    ],
)
def test_bad_periods_name_the_setting_and_the_units(text: str, problem: str):
    with pytest.raises(UserError) as error:
        Period.parse(text, "loop.validate_every")
    message = str(error.value)
    assert message.startswith(f"loop.validate_every={text!r}: {problem}; ")
    assert "steps, samples, tokens, s, min, h or d" in message and "\n" not in message


def test_seconds_periods_fire_on_a_fake_clock(tmp_path: Path):
    """Each step takes 7 s; a step's periods are decided as it starts, at 7 * (step - 1) s, so a period of 20 s
    fires at the steps where 7 * (step - 1) passes 20, 40, ..., 140 (the last one exactly)."""
    clock = FakeClock()
    control = LoopControl(validate_every="20 s", checkpoint_every="20 s", log_every="20 s", metrics_csv=False)
    control.clock = clock
    sampler = Every("20 s")
    trainer, recorder, logger = fit(control, sampler, max_steps=21, model=Toy(clock), root=tmp_path)
    expected = [4, 7, 10, 13, 16, 19, 21]
    # A checkpoint due at a validation's step is saved after it, so that it holds what the validation found.
    assert recorder.events == [(event, step) for step in expected for event in ("validate", "save")]
    assert sampler.fired == expected
    assert logger.steps == [step - 1 for step in expected]


def test_token_and_sample_periods_fire_where_the_counts_pass_a_multiple(tmp_path: Path):
    control = LoopControl(
        validate_every="20 tokens", log_every="10 tokens", checkpoint_every="5 samples", metrics_csv=False
    )
    sampler = Every("30 tokens")
    trainer, recorder, logger = fit(control, sampler, root=tmp_path)
    assert control.progress.tokens == RUNNING_TOKENS[-1] and control.progress.samples == 24
    assert recorder.validated == [3, 6, 9, 11]  # RUNNING_TOKENS passes 20, 40, 60, 80 at these steps
    assert sampler.fired == [4, 9, 12]
    assert recorder.saved == [3, 5, 8, 10]  # two samples a step: 6, 10, 16, 20 pass multiples of 5
    assert logger.steps == [step - 1 for step in (1, 3, 4, 6, 7, 9, 10, 11, 12)]
    assert (tmp_path / "last.ckpt").exists()


@pytest.mark.parametrize(
    ("budget", "steps"),
    [
        ("40 tokens", 6),
        ("20 tokens", 3),  # reached exactly
        ("21 tokens", 4),
        ("7 samples", 4),
        ("5 steps", 5),
        ("60 s", 9),  # time is read as a step ends: 7 * step
        (["1h", "40 tokens"], 6),
    ],
)
def test_a_budget_stops_the_run_after_the_first_step_that_reaches_it(
    tmp_path: Path, budget: str | list[str], steps: int
):
    clock = FakeClock()
    control = LoopControl(stop_at=budget, metrics_csv=False)
    control.clock = clock
    trainer, recorder, _ = fit(control, model=Toy(clock), root=tmp_path)
    assert trainer.global_step == steps
    assert control.progress.tokens == RUNNING_TOKENS[steps - 1]
    assert recorder.validated[-1] == steps  # stopping early validates the last step (Lightning: every epoch too)


@pytest.mark.parametrize("validate_every", ["20 tokens", "25 tokens"])
def test_a_resumed_run_keeps_the_schedule(tmp_path: Path, validate_every: str):
    """Six steps, then six more from the checkpoint, validate and log where twelve at once do. With 20 tokens
    a validation falls on the saved step (the checkpoint is saved after it), with 25 tokens none does."""
    settings = {"validate_every": validate_every, "log_every": "10 tokens", "metrics_csv": False}
    _, straight, straight_log = fit(LoopControl(**settings), root=tmp_path / "straight")
    first_control = LoopControl(**settings, checkpoint_every="6 steps")
    _, first, first_log = fit(first_control, max_steps=6, root=tmp_path)
    control = LoopControl(**settings)
    _, second, second_log = fit(control, root=tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert first.saved[-1] == 6
    assert first.validated + second.validated == straight.validated
    assert first_log.steps + second_log.steps == straight_log.steps
    assert control.progress.tokens == RUNNING_TOKENS[-1]


def test_a_run_resumed_past_its_budget_trains_nothing(tmp_path: Path):
    fit(LoopControl(checkpoint_every="6 steps", metrics_csv=False), max_steps=6, root=tmp_path)
    control = LoopControl(stop_at="40 tokens", metrics_csv=False)
    trainer, recorder, _ = fit(control, root=tmp_path, ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 6 and recorder.validated == []


class SavedTokens(Callback):
    """The ``tokens_seen`` of each checkpoint saved, with its step; after ``LoopControl`` among the callbacks."""

    def __init__(self):
        self.saved: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.saved.append((checkpoint["global_step"], checkpoint["tokens_seen"]))


class InterruptAt(Callback):
    """Asks ``SaveOnInterrupt`` to stop, as a Ctrl-C would, once training reaches ``step``."""

    def __init__(self, interrupt: SaveOnInterrupt, step: int):
        self.interrupt, self.step = interrupt, step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            self.interrupt.requested = True


def test_checkpoints_hold_the_tokens_of_the_step_they_save(tmp_path: Path):
    """Two batches a step; saved every two steps, then at the end of training by a Ctrl-C after step 5: each
    checkpoint has the tokens of the batches up to its step, and logging reports the running count."""
    control, saved = LoopControl(checkpoint_every="2 steps", metrics_csv=False), SavedTokens()
    logger = Recording("train/tokens_seen")
    interrupt = SaveOnInterrupt()
    trainer = Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        callbacks=[control, saved, InterruptAt(interrupt, 5), interrupt],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(Toy())
    assert interrupt.saved_to == tmp_path / "last.ckpt"
    assert saved.saved == [(2, RUNNING_TOKENS[3]), (4, RUNNING_TOKENS[7]), (5, RUNNING_TOKENS[9])]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["tokens_seen"] == RUNNING_TOKENS[9]
    assert logger.values == [RUNNING_TOKENS[2 * step + 1] for step in range(5)]


def test_metrics_csv_has_one_row_per_step_and_continues_an_existing_file(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    writer = MetricsCSV(path)
    writer.log_metrics({"lr": 0.1}, step=0)
    writer.log_metrics({"loss": torch.tensor(2.5)}, step=0)
    writer.log_metrics({"loss": 2.0}, step=1)
    assert read_csv(path) == [{"step": "0", "loss": "2.5", "lr": "0.1"}]  # step 1 may still log more
    writer.log_metrics({"val/loss": 3.0}, step=1)
    writer.finalize("success")
    resumed = MetricsCSV(path)
    resumed.log_metrics({"loss": 1.5, "accuracy": 0.5}, step=2)
    resumed.finalize("success")
    assert path.read_text().splitlines()[0] == "step,accuracy,loss,lr,val/loss"
    assert read_csv(path) == [
        {"step": "0", "accuracy": "", "loss": "2.5", "lr": "0.1", "val/loss": ""},
        {"step": "1", "accuracy": "", "loss": "2.0", "lr": "", "val/loss": "3.0"},
        {"step": "2", "accuracy": "0.5", "loss": "1.5", "lr": "", "val/loss": ""},
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def csv_scalars(path: Path) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for row in read_csv(path):
        for name, value in row.items():
            if name != "step" and value:
                scalars.setdefault(name, {})[int(row["step"])] = float(value)
    return scalars


def assert_csv_matches_tensorboard(run_dir: Path) -> None:
    logged, written = tensorboard_scalars(run_dir), csv_scalars(run_dir / "metrics.csv")
    assert written.keys() == logged.keys()
    for name, values in logged.items():
        assert written[name] == pytest.approx(values, rel=1e-6), name


def test_loop_settings_drive_a_real_run_that_resumes_and_stops_at_a_token_budget(
    in_tmp: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
):
    """The tiny language model trains 8 x 32 = 256 tokens a step."""
    accuracy_steps = []
    monkeypatch.setattr(lm, "token_accuracy", lambda *args: accuracy_steps.append(1) or token_accuracy(*args))
    loop = ["--loop.validate_every=1280 tokens", "--loop.log_every=512 tokens"]
    assert run_cli("fit", *tiny_args(corpus, *loop, "--trainer.max_steps=10")) == 0
    assert len(accuracy_steps) == 5  # the training accuracy is computed only on the steps that log it
    run_dir = in_tmp / "runs" / "defaults"
    logged = tensorboard_scalars(run_dir)
    assert sorted(logged["val/loss"]) == [4, 9]  # Lightning logs step s under s - 1
    assert sorted(logged["train/loss"]) == sorted(logged["lr-AdamW/matrices"]) == [1, 3, 5, 7, 9]
    assert sorted(logged["train/accuracy"]) == sorted(logged["train/bits_per_byte"]) == [1, 3, 5, 7, 9]
    assert_csv_matches_tensorboard(run_dir)
    first_rows = read_csv(run_dir / "metrics.csv")

    resume = ["--trainer.max_steps=20", "--loop.stop_at=3000 tokens", "--ckpt_path=last"]
    assert run_cli("fit", *tiny_args(corpus, *loop, *resume)) == 0
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 12 and saved["tokens_seen"] == 12 * 256  # step 11 had 2816 < 3000
    assert saved["callbacks"]["LoopControl"]["tokens"] == 12 * 256
    logged = tensorboard_scalars(run_dir)
    assert sorted(logged["val/loss"]) == [4, 9, 11]  # the stop validates
    assert sorted(logged["train/loss"]) == [1, 3, 5, 7, 9, 11]
    assert_csv_matches_tensorboard(run_dir)
    rows = read_csv(run_dir / "metrics.csv")
    assert [row["step"] for row in rows] == ["1", "3", "4", "5", "7", "9", "11"]
    assert [row["train/loss"] for row in rows[: len(first_rows)]] == [row["train/loss"] for row in first_rows]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--loop.validate_every=0 steps"], "loop.validate_every='0 steps': it must be more than zero; "),
        (["--loop.stop_at=[1h, 5 furlongs]"], "loop.stop_at='5 furlongs': unknown unit 'furlongs'; "),
        (["--loop.checkpoint_every=-30 min"], "loop.checkpoint_every='-30 min': not a period; "),
        (
            ["--trainer.callbacks+=xlab.callbacks.SampleText", "--trainer.callbacks.prompts=[a]"]
            + ["--trainer.callbacks.every=10 lines"],
            "SampleText.every='10 lines': unknown unit 'lines'; ",
        ),
    ],
)
def test_bad_loop_settings_are_one_clear_line(in_tmp: Path, corpus: Path, capsys, overrides: list[str], message: str):
    assert run_cli("fit", *tiny_args(corpus, *overrides)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: " + message) and "steps, samples, tokens, s, min, h or d" in err[-1], err
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(("max_epochs", "description"), [(-1, "Epoch 2"), (None, "Epoch 2"), (5, "Epoch 2/4")])
def test_the_rich_bar_names_the_epoch_limit_only_when_there_is_one(max_epochs: int | None, description: str):
    bar = LoopRichProgressBar(LoopControl(metrics_csv=False))
    bar._trainer = type("FakeTrainer", (), {"max_epochs": max_epochs})()
    assert bar._get_train_description(2).rstrip() == description
