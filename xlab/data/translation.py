"""The translation DataModule: sentence pairs in, per-batch padded source and target tensors out, cached on disk."""

import json
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from jsonargparse import lazy_instance
from tokenizers import Tokenizer
from torch import Tensor

from xlab.data.module import SPLITS, STAGE_SPLITS, XLabDataModule, digest, one_at_a_time
from xlab.data.pairs import SOURCE, TARGET, NumberPhrases, PairSource
from xlab.data.splits import SplitFractions
from xlab.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    check_vocab_size,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from xlab.errors import UserError
from xlab.files import atomic_directory, write_json_atomic

ENCODE_BATCH = 1000
ENCODED_COLUMNS = (
    "source_ids", "target_ids", "truncated", "source_text", "reference", "source_length", "target_length"
)  # fmt: skip


class TranslationDataModule(XLabDataModule):
    """Loads sentence pairs, splits them, trains one shared tokenizer (or one per side) on the
    train split and encodes every split.

    The encoder reads the source tokens then end-of-sequence; the decoder reads start then the
    target tokens and predicts the target tokens then end-of-sequence. ``context_length`` is
    the most tokens either side may have, those included; a longer pair is dropped or, with
    ``overlong: truncate``, cut to fit, and ``stats`` counts both. Batches are padded to their
    longest source and target, with boolean padding masks for each side.
    """

    records = "sentence pairs"

    def __init__(
        self,
        source: PairSource = lazy_instance(NumberPhrases),
        context_length: int = 64,
        vocab_size: int = 1000,
        shared_tokenizer: bool = True,
        overlong: Literal["drop", "truncate"] = "drop",
        splits: SplitFractions = SplitFractions(train=0.9, val=0.04, test=0.04, predict=0.02),
        seed: int = 42,
        batch_size: int = 64,
        num_workers: int = 0,
        cache_dir: str = "cache",
    ):
        super().__init__(source, splits, seed, batch_size, num_workers, cache_dir)
        check_vocab_size(vocab_size)
        if context_length < 2:
            raise UserError("data.context_length must be at least 2 (a token and the start or end token)")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.shared_tokenizer = shared_tokenizer
        self.overlong = overlong
        self.tokenizer: Tokenizer | None = None
        self.source_tokenizer: Tokenizer | None = None

    def tokenizer_paths(self) -> dict[str, Path]:
        """The tokenizer file of each side (the same file for both when shared)."""
        if self.shared_tokenizer:
            shared = self.data_dir / f"tokenizer-bpe{self.vocab_size}-shared.json"
            return {SOURCE: shared, TARGET: shared}
        return {side: self.data_dir / f"tokenizer-bpe{self.vocab_size}-{side}.json" for side in (SOURCE, TARGET)}

    def tokens_dir(self) -> Path:
        tokenizers = b"".join(path.read_bytes() for path in self.tokenizer_paths().values())
        return self.data_dir / f"pairs-{digest(tokenizers)}-len{self.context_length}-{self.overlong}"

    def tokenizers(self) -> dict[str, Tokenizer]:
        if self.tokenizer is None:
            return {}
        return {"tokenizer": self.tokenizer, "source_tokenizer": self.source_tokenizer}

    def model_shapes(self) -> dict[str, int | None]:
        """Each side's trained vocabulary (the source's None when the sides share one) and the context length."""
        self._train_tokenizers()
        paths = self.tokenizer_paths()
        source, target = (load_tokenizer(paths[side]).get_vocab_size() for side in (SOURCE, TARGET))
        shared = paths[SOURCE] == paths[TARGET]
        return {
            "vocab_size": target,
            "source_vocab_size": None if shared else source,
            "context_length": self.context_length,
        }

    def prepare_data(self) -> None:
        """Load, split, train the tokenizers and encode every split, unless the cache already has them."""
        paths = self.tokenizer_paths()
        if all(p.exists() for p in paths.values()) and (self.tokens_dir() / "stats.json").exists():
            return
        self._train_tokenizers()
        pairs, indices = self.split_source
        source_tokenizer, target_tokenizer = (load_tokenizer(paths[side]) for side in (SOURCE, TARGET))
        stats = {}
        for split in SPLITS:
            encoded = self._encode(pairs.select(indices[split]), source_tokenizer, target_tokenizer)
            stats[split] = {
                "pairs": len(encoded),
                "dropped": len(indices[split]) - len(encoded),
                "truncated": int(sum(encoded["truncated"])) if len(encoded) else 0,
                "source_tokens": int(sum(encoded["source_length"])) if len(encoded) else 0,
                "target_tokens": int(sum(encoded["target_length"])) if len(encoded) else 0,
            }
            with atomic_directory(self.tokens_dir() / split) as directory:
                encoded.save_to_disk(str(directory))
        write_json_atomic(self.tokens_dir() / "stats.json", stats)

    def _train_tokenizers(self) -> None:
        """Train each side's tokenizer on the train split, unless the cache has it."""
        paths = self.tokenizer_paths()
        sides = {SOURCE: [SOURCE, TARGET], TARGET: [TARGET]} if self.shared_tokenizer else {s: [s] for s in paths}
        for side, columns in sides.items():
            with one_at_a_time(paths[side]):
                if not paths[side].exists():
                    self._train_tokenizer(columns, paths[side])

    def _train_tokenizer(self, columns: list[str], path: Path) -> None:
        pairs, indices = self.split_source
        train = pairs.select(indices["train"])
        if len(train) == 0:
            raise UserError("the train split is empty: add sentence pairs or raise data.splits.train")
        texts = (batch[column] for batch in train.iter(batch_size=ENCODE_BATCH) for column in columns)
        save_tokenizer(train_tokenizer(texts, self.vocab_size), path)

    def _encode(self, pairs: datasets.Dataset, source: Tokenizer, target: Tokenizer) -> datasets.Dataset:
        return encode_pairs(pairs, source, target, self.context_length, self.overlong == "truncate")

    def stats(self) -> dict[str, dict[str, int]]:
        """Pairs kept, dropped and truncated, and tokens per side, per split, as counted when the cache was written."""
        return json.loads((self.tokens_dir() / "stats.json").read_text())

    def stats_table(self) -> str:
        header = (
            f"{'split':<8} {'pairs':>9} {'dropped':>8} {'truncated':>9} {'source tokens':>14} {'target tokens':>14}"
        )
        rows = [header]
        for split, s in self.stats().items():
            rows.append(
                f"{split:<8} {s['pairs']:>9,} {s['dropped']:>8,} {s['truncated']:>9,} "
                f"{s['source_tokens']:>14,} {s['target_tokens']:>14,}"
            )
        return "\n".join(rows)

    def setup(self, stage: str) -> None:
        paths = self.tokenizer_paths()
        self.source_tokenizer, self.tokenizer = (load_tokenizer(paths[side]) for side in (SOURCE, TARGET))
        stats = self.stats()
        for split in STAGE_SPLITS[stage]:
            if stats[split]["pairs"] == 0:
                raise UserError(
                    f"the {split} split has no sentence pairs within {self.context_length} tokens: raise "
                    f"data.splits.{split} or data.context_length, or set data.overlong to truncate"
                )
            self.datasets[split] = datasets.load_from_disk(str(self.tokens_dir() / split))

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)


def encode_pairs(
    pairs: datasets.Dataset, source: Tokenizer, target: Tokenizer, limit: int, truncate: bool
) -> datasets.Dataset:
    """Encode ``source`` / ``target`` columns into ``ENCODED_COLUMNS``: the encoder's tokens then end-of-sequence,
    the decoder's start, tokens and end-of-sequence. A pair longer than ``limit`` tokens on either side is
    dropped, or cut to fit with ``truncate``."""

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        rows = []
        for text, translation, src, tgt in zip(
            batch[SOURCE], batch[TARGET], source.encode_batch(batch[SOURCE]), target.encode_batch(batch[TARGET])
        ):
            long = len(src.ids) + 1 > limit or len(tgt.ids) + 1 > limit
            if long and not truncate:
                continue
            src_ids, tgt_ids = src.ids[: limit - 1] + [EOS_ID], [BOS_ID] + tgt.ids[: limit - 1] + [EOS_ID]
            rows.append(
                {
                    "source_ids": src_ids,
                    "target_ids": tgt_ids,
                    "truncated": long,
                    "source_text": text,
                    "reference": translation,
                    "source_length": len(src_ids),
                    "target_length": len(tgt_ids) - 1,
                }
            )
        return {column: [row[column] for row in rows] for column in ENCODED_COLUMNS}

    return pairs.map(
        encode, batched=True, batch_size=ENCODE_BATCH, remove_columns=[SOURCE, TARGET], desc="Encoding pairs"
    )


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of encoded pairs into tensors, each side to its own longest sequence in the batch.

    ``source`` (batch, S) and ``target_input`` / ``target`` (batch, T) hold ``PAD_ID`` where the
    matching ``*_padding`` mask is True; ``target_bytes`` are the UTF-8 bytes of each reference.
    """
    source, source_padding = _pad([item["source_ids"] for item in items])
    full, full_padding = _pad([item["target_ids"] for item in items])
    return {
        "source": source,
        "source_padding": source_padding,
        "target_input": full[:, :-1].masked_fill(full_padding[:, 1:], PAD_ID),
        "target": full[:, 1:],
        "target_padding": full_padding[:, 1:],
        "target_bytes": torch.tensor([len(item["reference"].encode()) for item in items]),
        "source_text": [item["source_text"] for item in items],
        "reference": [item["reference"] for item in items],
    }


def _pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    length = max(map(len, rows))
    tokens = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row)
    return tokens, tokens.new_tensor([[i >= len(row) for i in range(length)] for row in rows], dtype=torch.bool)
