"""What every XLab DataModule shares: the cache layout, tokenizers in checkpoints, and the data loaders."""

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Protocol

import datasets
import numpy as np
import torch
from filelock import FileLock
from lightning.pytorch import LightningDataModule
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from xlab.data.loading import ResumableLoader, ResumableSampler, ShardSampler
from xlab.data.splits import SplitFractions, split_indices
from xlab.errors import UserError

SPLITS = tuple(asdict(SplitFractions()))
# What the data decides of a model's architecture (TransformerConfig fields); None: as the model's default.
MODEL_SHAPES = ("vocab_size", "source_vocab_size", "context_length")


class Source(Protocol):
    """Where a DataModule's records come from (``xlab.data.sources``, ``xlab.data.pairs``)."""

    def cache_key(self) -> str: ...

    def load(self) -> datasets.Dataset: ...


STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def one_at_a_time(path: Path) -> FileLock:
    """A lock beside ``path``: the processes that start together (DDP ranks, SLURM tasks) each need a cache
    entry such as a tokenizer before training; the first writes it while the others wait, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(path.name + ".lock"))


def digest(value: object) -> str:
    """A short stable hash for cache names."""
    data = value if isinstance(value, bytes) else repr(value).encode()
    return hashlib.sha256(data).hexdigest()[:12]


class XLabDataModule(LightningDataModule):
    """Splits, cached under ``cache_dir/<source key>-split<hash>``, loaded into ``self.datasets``.

    Subclasses fill ``self.datasets`` in ``setup``, name their tokenizers in ``tokenizers()``
    (stored in every checkpoint) and may set ``collate_fn``; training batches are shuffled
    and resumable mid-epoch, evaluation batches sharded across processes without repeats.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None
    records: ClassVar[str]  # what the source's records are, for messages

    def __init__(
        self, source: Source, splits: SplitFractions, seed: int, batch_size: int, num_workers: int, cache_dir: str
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError("data.batch_size must be at least 1")
        self.source = source
        self.cache_key = source.cache_key()
        self.splits = splits
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir)
        self.datasets: dict[str, Dataset] = {}

    @functools.cached_property
    def split_source(self) -> tuple[datasets.Dataset, dict[str, np.ndarray]]:
        """The source's records and each split's indices into them; loaded once per DataModule."""
        records = self.source.load()
        if len(records) == 0:
            raise UserError(f"the data source {type(self.source).__name__} has no {self.records}: point it at some")
        return records, split_indices(len(records), self.splits, self.seed)

    @property
    def data_dir(self) -> Path:
        return self.cache_dir / f"{self.cache_key}-split{digest((asdict(self.splits), self.seed))}"

    def tokenizers(self) -> dict[str, Tokenizer]:
        """The loaded tokenizers by checkpoint key (``tokenizer`` is the one the model writes with)."""
        return {}

    def model_shapes(self) -> dict[str, int | None]:
        """The shapes the model must have for this data (``MODEL_SHAPES``), from the trained tokenizers (trained
        here if the cache lacks them): the CLI links them into ``model.init_args.arch``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, str]:
        """Lightning stores this in every checkpoint, so the weights never travel without their tokenizers."""
        return {name: tokenizer.to_str() for name, tokenizer in self.tokenizers().items()}

    def load_state_dict(self, state: dict[str, str]) -> None:
        for name, tokenizer in self.tokenizers().items():
            saved = state.get(name)
            if saved and json.loads(saved) != json.loads(tokenizer.to_str()):
                raise UserError(
                    f"the checkpoint was trained with another {name.replace('_', ' ')} than this data's "
                    f"({self.data_dir}): use the data settings the checkpoint was trained with"
                )

    def world(self) -> tuple[int, int]:
        """(processes, this process's rank)."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world_size, rank = self.world()
        if len(dataset) < self.batch_size * world_size:
            raise UserError(
                f"the train split has {len(dataset)} examples, fewer than one batch of {self.batch_size} "
                f"on each of {world_size} processes: lower data.batch_size or add data"
            )
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        return ResumableLoader(dataset, sampler, **self.loader_options(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.evaluation_loader("predict")

    def evaluation_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(dataset, sampler=ShardSampler(dataset, *self.world()), **self.loader_options())

    def loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
            "collate_fn": self.collate_fn,
        }
