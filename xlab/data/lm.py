"""The language-model DataModule: documents in, packed token sequences out, everything cached on disk."""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from xlab.data.encoding import encode_documents, write_packed
from xlab.data.loading import PackedSequences, ResumableLoader, ResumableSampler, ShardSampler
from xlab.data.sources import TEXT, PythonDocs, TextSource
from xlab.data.splits import SplitFractions, split_indices
from xlab.data.tokenizer import check_vocab_size, load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer
from xlab.errors import UserError
from xlab.files import write_json_atomic

SPLITS = tuple(asdict(SplitFractions()))
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def _digest(value: object) -> str:
    """A short stable hash for cache names."""
    data = value if isinstance(value, bytes) else repr(value).encode()
    return hashlib.sha256(data).hexdigest()[:12]


class LMDataModule(LightningDataModule):
    """Loads a text source, splits it by document, trains a tokenizer on the train split and packs
    each split into ``context_length`` + 1 token windows separated by end-of-sequence tokens.

    The cache under ``cache_dir`` is keyed by source, split and tokenizer, so a second run
    (or another rank) reuses it without touching the source.
    """

    def __init__(
        self,
        source: TextSource = lazy_instance(PythonDocs),
        context_length: int = 256,
        vocab_size: int = 4096,
        special_tokens: Sequence[str] = (),
        splits: SplitFractions = SplitFractions(),
        seed: int = 42,
        batch_size: int = 32,
        num_workers: int = 0,
        num_proc: int | None = None,
        tokenizer_max_documents: int | None = None,
        cache_dir: str = "cache",
    ):
        super().__init__()
        check_vocab_size(vocab_size, special_tokens)
        if context_length < 1 or batch_size < 1:
            raise UserError("data.context_length and data.batch_size must be at least 1")
        self.source = source
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.special_tokens = tuple(special_tokens)
        self.splits = splits
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.tokenizer_max_documents = tokenizer_max_documents
        self.cache_dir = Path(cache_dir)
        self.tokenizer = None
        self.datasets: dict[str, PackedSequences] = {}

    @property
    def data_dir(self) -> Path:
        return self.cache_dir / f"{self.source.cache_key()}-split{_digest((asdict(self.splits), self.seed))}"

    @property
    def tokenizer_path(self) -> Path:
        limit = f"-max{self.tokenizer_max_documents}" if self.tokenizer_max_documents else ""
        extra = f"-special{_digest(self.special_tokens)}" if self.special_tokens else ""
        return self.data_dir / f"tokenizer-bpe{self.vocab_size}{limit}{extra}.json"

    def tokens_dir(self) -> Path:
        return self.data_dir / f"tokens-{_digest(self.tokenizer_path.read_bytes())}"

    def prepare_data(self) -> None:
        """Load, split, train the tokenizer and encode every split, unless the cache already has them."""
        if self.tokenizer_path.exists() and (self.tokens_dir() / "stats.json").exists():
            return
        documents = self.source.load()
        if len(documents) == 0:
            raise UserError(f"the data source {type(self.source).__name__} has no documents: point it at some text")
        indices = split_indices(len(documents), self.splits, self.seed)
        if not self.tokenizer_path.exists():
            self._train_tokenizer(documents.select(indices["train"]))
        tokenizer = load_tokenizer(self.tokenizer_path)
        stats = {}
        for split in SPLITS:
            encoded = encode_documents(documents.select(indices[split]), tokenizer, self.num_proc)
            stats[split] = write_packed(encoded, self.tokens_dir() / f"{split}.npy", self.vocab_size)
        write_json_atomic(self.tokens_dir() / "stats.json", stats)

    def _train_tokenizer(self, train: datasets.Dataset) -> None:
        if len(train) == 0:
            raise UserError("the train split is empty: add documents or raise data.splits.train")
        if self.tokenizer_max_documents:
            train = train.select(range(min(len(train), self.tokenizer_max_documents)))
        batches = (batch[TEXT] for batch in train.iter(batch_size=1000))
        tokenizer = train_tokenizer(batches, self.vocab_size, self.special_tokens, length=len(train))
        save_tokenizer(tokenizer, self.tokenizer_path)

    def stats(self) -> dict[str, dict[str, int]]:
        """Documents, bytes and tokens per split, as counted when the cache was written."""
        return json.loads((self.tokens_dir() / "stats.json").read_text())

    def setup(self, stage: str) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        token_bytes = token_byte_lengths(self.tokenizer, self.vocab_size)
        for split in STAGE_SPLITS[stage]:
            tokens = np.load(self.tokens_dir() / f"{split}.npy", mmap_mode="r")
            dataset = PackedSequences(tokens, self.context_length, token_bytes)
            if len(dataset) == 0:
                raise UserError(
                    f"the {split} split has {len(tokens)} tokens, too few for one sequence of "
                    f"{self.context_length + 1}: raise data.splits.{split}, add text, or shorten data.context_length"
                )
            self.datasets[split] = dataset

    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def state_dict(self) -> dict[str, str]:
        """Lightning stores this in every checkpoint, so the weights never travel without their tokenizer."""
        return {"tokenizer": self.tokenizer.to_str()} if self.tokenizer else {}

    def load_state_dict(self, state: dict[str, str]) -> None:
        saved = state.get("tokenizer")
        if saved and self.tokenizer and json.loads(saved) != json.loads(self.tokenizer.to_str()):
            raise UserError(
                f"the checkpoint was trained with another tokenizer than {self.tokenizer_path}: "
                "use the data settings the checkpoint was trained with"
            )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world_size, rank = self._world()
        if len(dataset) < self.batch_size * world_size:
            raise UserError(
                f"the train split has {len(dataset)} sequences, fewer than one batch of {self.batch_size} "
                f"on each of {world_size} processes: lower data.batch_size or add text"
            )
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=self.seed)
        return ResumableLoader(dataset, sampler, **self._loader_options(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("predict")

    def _evaluation_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(dataset, sampler=ShardSampler(dataset, *self._world()), **self._loader_options())

    def _loader_options(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
