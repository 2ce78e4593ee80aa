"""XLabCLI: one LightningCLI for training, evaluation and data preparation, configured in YAML."""

import logging
import pickle
import re
import sys
import traceback
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from xlab.callbacks import EngineDecoding, SaveOnInterrupt, TokensPerSecond
from xlab.checkpoint import is_export, load, recorded_network
from xlab.data.module import MODEL_SHAPES, XLabDataModule
from xlab.errors import UserError
from xlab.loop import LoopControl
from xlab.models.transforms import as_config
from xlab.predictions import WritePredictions
from xlab.slurm import RequeueOnSignal, check_allocation, requeued_checkpoint

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_CONFIG = CONF_DIR / "defaults.yaml"
INTERRUPTED_EXIT_CODE = 130
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")  # names Lightning resolves itself


def model_shape(key: str, data: XLabDataModule) -> int | None:
    """One of the architecture's shapes as the data decides it (``XLabDataModule.model_shapes``)."""
    return data.model_shapes()[key]


def raised_by_settings_check(error: BaseException) -> bool:
    """Whether ``error`` came from Lightning's accelerator connector, which checks the trainer's settings."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).name == "accelerator_connector.py"


class XLabTrainer(Trainer):
    """Lightning's Trainer with the data subcommands of the CLI."""

    def prepare(self, model: LightningModule, datamodule: LightningDataModule) -> None:
        """Load the source, split it, train the tokenizer and encode every split into the cache."""
        datamodule.prepare_data()
        print(f"prepared {datamodule.tokens_dir()}")

    def stats(self, model: LightningModule, datamodule: LightningDataModule) -> None:
        """Print documents, bytes and tokens per split, and bytes per token."""
        datamodule.prepare_data()
        print(datamodule.stats_table())


class XLabCLI(LightningCLI):
    """``fit``, ``validate``, ``test``, ``predict`` plus the data subcommands ``prepare`` and ``stats``.

    ``conf/defaults.yaml`` is read first, then ``-c FILE``, then command-line overrides.
    The model and data classes are chosen in YAML by ``class_path``.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True):
        defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
        parser_kwargs = {name: defaults for name in self.subcommands()} if run else defaults
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=XLabTrainer,
            trainer_defaults={
                "callbacks": [
                    TokensPerSecond(),
                    SaveOnInterrupt(),
                    RequeueOnSignal(),
                    LearningRateMonitor("step"),
                    WritePredictions(),
                    EngineDecoding(),
                ]
            },
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "prepare": {"model", "datamodule"}, "stats": {"model", "datamodule"}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers raise instead of printing usage, so that main() can report one line."""
        return super().init_parser(**{"exit_on_error": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LoopControl, "loop")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        for key in MODEL_SHAPES:
            parser.link_arguments(
                "data", f"model.init_args.arch.{key}", partial(model_shape, key), apply_on="instantiate"
            )

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from the checkpoint's architecture and transforms rather than the YAML's, except
        for the shapes the data links in (they must agree anyway, and a link target cannot be set)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in (None, *NAMED_CHECKPOINTS):
            return
        recorded = recorded_network(ckpt_path)
        if recorded is None:
            return
        arch = {key: value for key, value in recorded["arch"].items() if key not in MODEL_SHAPES}
        network = {"arch": arch, "transforms": as_config(recorded["transforms"])}
        class_path = self.config[subcommand].model.class_path
        overrides = {subcommand: {"model": {"class_path": class_path, "init_args": network}}}
        self.config = self.parser.parse_object(overrides, self.config)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning reads only its own checkpoints, and unpickles nothing but tensors and plain values unless
        ``--weights_only false`` says to trust the file: load an export's weights here and give it none."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True
        path = kwargs.get("ckpt_path")
        if path not in (None, *NAMED_CHECKPOINTS) and is_export(Path(path)):
            if subcommand == "fit":
                raise UserError(f"{path} is an export, without optimizer state: resume from a training checkpoint")
            self.model.model.load_state_dict(load(path).model.state_dict())
            kwargs["ckpt_path"] = None
        return kwargs

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's checks of strategy, accelerator, devices and precision raise ValueError; those are the
        user's settings, so they end as one line like every other mistake."""
        try:
            return super().instantiate_trainer(**kwargs)
        except ValueError as error:
            if not raised_by_settings_check(error):
                raise
            raise UserError(f"these trainer settings do not work together: {error}") from None

    def before_instantiate_classes(self) -> None:
        """Under SLURM, a run that does not match the allocation stops here, before anything is built."""
        trainer = self._get(self.config, "trainer")
        check_allocation(trainer.num_nodes, trainer.devices, trainer.accelerator)

    def before_fit(self) -> None:
        """Refuse to start a new run over the checkpoints of an earlier one; a requeued SLURM job resumes its own."""
        directory = Path(self.trainer.checkpoint_callback.dirpath or Path(self.trainer.log_dir) / "checkpoints")
        if requeued_checkpoint(self.trainer) is not None:
            self.config_init[self.subcommand]["ckpt_path"] = "last"
            return
        if self.config_init[self.subcommand].get("ckpt_path") is not None:
            return
        if any(directory.glob("*.ckpt")):
            raise UserError(
                f"{directory} already holds checkpoints: resume with --ckpt_path last, or start a new run "
                "with --trainer.logger.init_args.name NAME"
            )

    def after_predict(self) -> None:
        writer = next(cb for cb in self.trainer.callbacks if isinstance(cb, WritePredictions))
        if writer.written is not None:
            print(f"wrote {writer.written}")

    def after_fit(self) -> None:
        interrupt = next(cb for cb in self.trainer.callbacks if isinstance(cb, SaveOnInterrupt))
        if interrupt.saved_to is not None:
            raise Interrupted(
                f"interrupted at step {self.trainer.global_step}: saved {interrupt.saved_to}; "
                "resume with the same command and --ckpt_path last"
            )


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a resumable checkpoint."""


USER_MISTAKES = (UserError, ArgumentError, MisconfigurationException, FileNotFoundError, pickle.UnpicklingError)


def quiet_third_party_noise() -> None:
    """Drop an advertisement and a deprecation notice Lightning prints on every run; they say nothing about it."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def main(args: list[str] | None = None) -> int:
    """Run the CLI; map user mistakes to one line on stderr and a non-zero exit code."""
    quiet_third_party_noise()
    try:
        XLabCLI(args)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as error:
        mistake = user_mistake(error)
        if mistake is None:
            raise
        print(f"error: {describe(mistake)}", file=sys.stderr)
        return 2
    return 0


def user_mistake(error: BaseException | None) -> BaseException | None:
    """The user's mistake behind ``error``, looking through the wrappers jsonargparse adds, or None for a bug."""
    while error is not None:
        if isinstance(error, USER_MISTAKES):
            return error
        error = error.__cause__ or error.__context__
    return None


_CLASS_PROBLEM = re.compile(r"Parser key \"(\w+)\".*?Problem with given class_path '([^']+)': (.*?)(?: - Expected a|$)")


def describe(error: BaseException) -> str:
    """One line: jsonargparse's nested union report reduced to the part about the chosen class."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "the checkpoint holds pickled objects other than tensors and plain values, which XLab does not "
            "unpickle; pass --weights_only false only if you trust the file"
        )
    text = " ".join(str(error).split())
    problem = _CLASS_PROBLEM.search(text)
    if problem:
        group, class_path, detail = problem.groups()
        detail = detail.replace("unrecognized arguments: --", f"unknown option --{group}.init_args.")
        text = f"{group} ({class_path}): {detail}"
    if isinstance(error, ArgumentError):
        text += " (--print_config lists every valid key)"
    return text
