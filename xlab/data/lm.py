"""The language-model DataModule: documents in, packed token sequences out, everything cached on disk."""

import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
from jsonargparse import lazy_instance
from tokenizers import Tokenizer

from xlab.data.encoding import encode_documents, write_packed
from xlab.data.loading import PackedSequences
from xlab.data.module import SPLITS, STAGE_SPLITS, XLabDataModule, digest, one_at_a_time
from xlab.data.sources import TEXT, PythonDocs, TextSource
from xlab.data.splits import SplitFractions
from xlab.data.tokenizer import check_vocab_size, load_tokenizer, save_tokenizer, token_byte_lengths, train_tokenizer
from xlab.errors import UserError
from xlab.files import write_json_atomic


class LMDataModule(XLabDataModule):
    """Loads a text source, splits it by document, trains a tokenizer on the train split and packs
    each split into ``context_length`` + 1 token windows separated by end-of-sequence tokens.

    The cache under ``cache_dir`` is keyed by source, split and tokenizer, so a second run
    (or another rank) reuses it without touching the source.
    """

    records = "documents"

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
        super().__init__(source, splits, seed, batch_size, num_workers, cache_dir)
        check_vocab_size(vocab_size, special_tokens)
        if context_length < 1:
            raise UserError("data.context_length must be at least 1")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.special_tokens = tuple(special_tokens)
        self.num_proc = num_proc
        self.tokenizer_max_documents = tokenizer_max_documents
        self.tokenizer: Tokenizer | None = None

    @property
    def tokenizer_path(self) -> Path:
        limit = f"-max{self.tokenizer_max_documents}" if self.tokenizer_max_documents else ""
        extra = f"-special{digest(self.special_tokens)}" if self.special_tokens else ""
        return self.data_dir / f"tokenizer-bpe{self.vocab_size}{limit}{extra}.json"

    def tokens_dir(self) -> Path:
        return self.data_dir / f"tokens-{digest(self.tokenizer_path.read_bytes())}"

    def tokenizers(self) -> dict[str, Tokenizer]:
        return {"tokenizer": self.tokenizer} if self.tokenizer else {}

    def model_shapes(self) -> dict[str, int | None]:
        """The trained tokenizer's vocabulary (at most ``vocab_size``) and the context length."""
        self.prepare_tokenizer()
        size = load_tokenizer(self.tokenizer_path).get_vocab_size()
        return {"vocab_size": size, "source_vocab_size": None, "context_length": self.context_length}

    def prepare_tokenizer(self) -> None:
        """Train the tokenizer on the train split unless the cache has it."""
        with one_at_a_time(self.tokenizer_path):
            if not self.tokenizer_path.exists():
                documents, indices = self.split_source
                self._train_tokenizer(documents.select(indices["train"]))

    def prepare_data(self) -> None:
        """Load, split, train the tokenizer and encode every split, unless the cache already has them."""
        if self.tokenizer_path.exists() and (self.tokens_dir() / "stats.json").exists():
            return
        self.prepare_tokenizer()
        documents, indices = self.split_source
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

    def stats_table(self) -> str:
        """``stats`` as a table, with bytes per token and the sequences each split makes."""
        header = f"{'split':<8} {'documents':>10} {'bytes':>13} {'tokens':>12} {'bytes/token':>11} {'sequences':>10}"
        rows = [header]
        for split, s in self.stats().items():
            ratio = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
            sequences = max(0, (s["tokens"] - 1) // self.context_length)
            rows.append(
                f"{split:<8} {s['documents']:>10,} {s['bytes']:>13,} {s['tokens']:>12,} {ratio:>11.2f} {sequences:>10,}"
            )
        return "\n".join(rows)

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
