"""Train, save and load the byte-level BPE tokenizer; the special tokens are defined here and nowhere else."""

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xlab.errors import UserError
from xlab.files import write_atomic

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
BYTE_ALPHABET = 256


def special_tokens(extra: Sequence[str] = ()) -> list[str]:
    """Padding, start and end at ids 0, 1, 2, which every model relies on, then the user's own."""
    tokens = [*SPECIAL_TOKENS, *extra]
    if len(set(tokens)) < len(tokens) or not all(extra):
        raise UserError(f"data.special_tokens must be distinct, non-empty and not {', '.join(SPECIAL_TOKENS)}")
    return tokens


def check_vocab_size(vocab_size: int, extra_special_tokens: Sequence[str] = ()) -> None:
    specials = len(special_tokens(extra_special_tokens))
    if vocab_size < BYTE_ALPHABET + specials:
        raise UserError(
            f"data.vocab_size {vocab_size} is too small: a byte-level tokenizer needs {BYTE_ALPHABET} byte tokens "
            f"plus {specials} special tokens, so at least {BYTE_ALPHABET + specials}"
        )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, extra_special_tokens: Sequence[str] = (), length: int | None = None
) -> Tokenizer:
    """A byte-level BPE tokenizer: lossless for any Unicode text; pad, bos, eos at ids 0, 1, 2,
    then ``extra_special_tokens``, which are never split or merged."""
    check_vocab_size(vocab_size, extra_special_tokens)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write the tokenizer JSON under a temporary name and rename it into place."""
    write_atomic(path, tokenizer.to_str().encode())


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:
        raise UserError(f"cannot read tokenizer {path}: {error}") from None


def token_byte_lengths(tokenizer: Tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special and unused ids), to turn losses into bits per byte.

    In byte-level BPE each character of a vocabulary entry stands for exactly one byte.
    """
    lengths = np.zeros(size, dtype=np.int64)
    special = {added.content for added in tokenizer.get_added_tokens_decoder().values() if added.special}
    for token, index in tokenizer.get_vocab().items():
        if token not in special and index < size:
            lengths[index] = len(token)
    return lengths
