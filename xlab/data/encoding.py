"""Tokenize documents in parallel with ``datasets.map`` and pack them into one token array on disk."""

import os
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer

from xlab.data.sources import TEXT
from xlab.data.tokenizer import EOS_ID
from xlab.files import atomic_path

ENCODE_BATCH = 1000


def encode_documents(documents: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None) -> datasets.Dataset:
    """Replace ``text`` by ``ids`` (token ids), ``length`` (their count) and ``bytes`` (UTF-8 size)."""
    if num_proc and num_proc > 1:
        # Each worker is a forked process; the Rust thread pool must not be shared across the fork.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        texts = batch[TEXT]
        ids = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
        return {"ids": ids, "length": [len(i) for i in ids], "bytes": [len(text.encode()) for text in texts]}

    return documents.map(
        encode,
        batched=True,
        batch_size=ENCODE_BATCH,
        num_proc=num_proc if num_proc and num_proc > 1 and len(documents) >= num_proc else None,
        remove_columns=[TEXT],
        desc="Encoding",
    )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_packed(encoded: datasets.Dataset, path: Path, vocab_size: int) -> dict[str, int]:
    """Write every document's tokens followed by an end-of-sequence separator as one ``.npy`` array.

    Streams in batches, so the array may be larger than memory. Returns the split's statistics.
    """
    if len(encoded) == 0:
        lengths, byte_count = [], 0
    else:
        lengths, byte_count = encoded["length"], int(np.sum(encoded["bytes"]))
    total = int(np.sum(lengths)) + len(lengths)
    with atomic_path(path) as temporary:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=token_dtype(vocab_size), shape=(total,))
        offset = 0
        for batch in encoded.iter(batch_size=ENCODE_BATCH) if len(encoded) else ():
            for ids in batch["ids"]:
                array[offset : offset + len(ids)] = ids
                array[offset + len(ids)] = EOS_ID
                offset += len(ids) + 1
        array.flush()
        del array
    return {"documents": len(encoded), "bytes": byte_count, "tokens": total}
