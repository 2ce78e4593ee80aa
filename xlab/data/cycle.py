"""The cycle-consistent translation DataModule: two monolingual pools, a few pairs, paired val and test sets.

Pairs come from any ``xlab.data.pairs`` source (embedded number phrases, local files, a hub
dataset). They are deduplicated on both sides, shuffled with ``seed`` and cut in order into
val, test, the ``paired_size`` training pairs and the rest. The monolingual pools are either
the rest cut in two halves, the first half's source side for the source language and the
second half's target side for the target language (so no sentence of one pool is a
translation of one in the other), or any ``xlab.data.sources`` text source per language, with
every sentence of the val, test and paired sets removed.
"""

import functools
import json
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from jsonargparse import lazy_instance
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from xlab.data.module import XLabDataModule, digest, one_at_a_time
from xlab.data.pairs import SOURCE, TARGET, NumberPhrases, PairSource
from xlab.data.sources import TEXT, TextSource
from xlab.data.splits import SplitFractions
from xlab.data.tokenizer import EOS_ID, check_vocab_size, load_tokenizer, save_tokenizer, train_tokenizer
from xlab.data.translation import ENCODE_BATCH, collate_pairs, encode_pairs
from xlab.errors import UserError
from xlab.files import atomic_directory, write_json_atomic

EVALUATION = ("val", "test")
PAIRED = ("paired", *EVALUATION)


def directions(languages: tuple[str, str]) -> tuple[str, str]:
    """The two directions between ``languages``, the source language's first: ("en-it", "it-en")."""
    first, second = languages
    return f"{first}-{second}", f"{second}-{first}"


def check_languages(languages: tuple[str, str] | list[str]) -> tuple[str, str]:
    """The two languages, distinct and usable in a direction's name; a UserError otherwise."""
    if len(languages) != 2 or languages[0] == languages[1] or not all(languages):
        raise UserError(f"a cycle translator needs two distinct languages, got {list(languages)}")
    if any(not lang.replace("_", "").isalnum() for lang in languages):
        raise UserError(f"language names may hold letters, digits and '_' only, got {list(languages)}")
    return languages[0], languages[1]


class CycleDataModule(XLabDataModule):
    """Monolingual pools per language, ``paired_size`` training pairs and paired val/test sets, all disjoint.

    ``languages`` names the source and target language of ``source`` (checked against its
    ``source_lang`` / ``target_lang`` when it has them). ``source_text`` / ``target_text``:
    a text source per language for its pool instead of the pairs' unused rows. One byte-level
    BPE tokenizer is trained on the pools and the paired training set (both directions share it).
    Training batches hold a batch of each pool and, when there are pairs, a batch of pairs per
    direction; each is drawn from its own endless shuffled stream (``PoolStreams``). A pool batch holds
    ``batch_size`` sentences and a pair batch ``paired_batch_size`` pairs (``batch_size`` when unset, at most the
    paired set): the few pairs repeat every update, so a smaller pair batch leaves the compute to the pools.
    """

    records = "sentence pairs"

    def __init__(
        self,
        source: PairSource = lazy_instance(NumberPhrases, size=20_000),
        languages: tuple[str, str] = ("en", "it"),
        source_text: TextSource | None = None,
        target_text: TextSource | None = None,
        paired_size: int = 200,
        val_size: int = 500,
        test_size: int = 500,
        context_length: int = 64,
        vocab_size: int = 1000,
        overlong: Literal["drop", "truncate"] = "drop",
        seed: int = 42,
        batch_size: int = 64,
        paired_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str = "cache",
    ):
        super().__init__(source, SplitFractions(), seed, batch_size, num_workers, cache_dir)
        check_vocab_size(vocab_size)
        self.languages = check_languages(languages)
        for side, lang in zip(("source_lang", "target_lang"), self.languages):
            if getattr(source, side, lang) != lang:
                raise UserError(
                    f"data.languages {list(self.languages)} do not match the source's {side} "
                    f"{getattr(source, side)!r}: make them agree"
                )
        for name, value in (("paired_size", paired_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 0:
                raise UserError(f"data.{name} must be >= 0, got {value}")
        if paired_batch_size is not None and paired_batch_size < 1:
            raise UserError(f"data.paired_batch_size must be at least 1 (or null: batch_size), got {paired_batch_size}")
        if min(val_size, test_size) < 1:
            raise UserError("data.val_size and data.test_size must be at least 1")
        if context_length < 2:
            raise UserError("data.context_length must be at least 2 (a token and the start or end token)")
        self.texts = dict(zip(self.languages, (source_text, target_text)))
        self.sizes = {"paired": paired_size, "val": val_size, "test": test_size}
        self.paired_batch_size = paired_batch_size or batch_size
        self.context_length, self.vocab_size, self.overlong = context_length, vocab_size, overlong
        self.tokenizer: Tokenizer | None = None

    @property
    def directions(self) -> tuple[str, str]:
        return directions(self.languages)

    @property
    def data_dir(self) -> Path:
        texts = [text.cache_key() if text else None for text in self.texts.values()]
        settings = (self.languages, texts, self.sizes, self.seed)
        return self.cache_dir / f"{self.cache_key}-cycle{digest(settings)}"

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / f"tokenizer-bpe{self.vocab_size}-shared.json"

    def tokens_dir(self) -> Path:
        tokenizer = digest(self.tokenizer_path.read_bytes())
        return self.data_dir / f"cycle-{tokenizer}-len{self.context_length}-{self.overlong}"

    def tokenizers(self) -> dict[str, Tokenizer]:
        return {} if self.tokenizer is None else {"tokenizer": self.tokenizer}

    def model_shapes(self) -> dict[str, int | None]:
        self._train_tokenizer()
        vocab = load_tokenizer(self.tokenizer_path).get_vocab_size()
        return {"vocab_size": vocab, "source_vocab_size": None, "context_length": self.context_length}

    @functools.cached_property
    def corpora(self) -> dict[str, datasets.Dataset]:
        """The paired sets (``source`` / ``target`` columns) and each language's pool (a ``text`` column)."""
        pairs = _unique_on_both_sides(self.source.load())
        order = np.random.default_rng(self.seed).permutation(len(pairs))
        needed = sum(self.sizes.values())
        if needed > len(pairs):
            raise UserError(
                f"data.paired_size, val_size and test_size ({self.sizes['paired']} + {self.sizes['val']} + "
                f"{self.sizes['test']}) need {needed:,} pairs, and the source has {len(pairs):,} distinct ones: "
                "lower them or give the source more pairs"
            )
        parts, start = {}, 0
        for name in ("val", "test", "paired"):
            parts[name] = pairs.select(np.sort(order[start : start + self.sizes[name]]))
            start += self.sizes[name]
        rest = pairs.select(np.sort(order[start:]))
        half = len(rest) // 2
        halves = {SOURCE: rest.select(range(half)), TARGET: rest.select(range(half, len(rest)))}
        for side, lang in zip((SOURCE, TARGET), self.languages):
            text = self.texts[lang]
            pool = halves[side][side] if text is None else _sentences(text, lang)
            taken = {sentence for name in PAIRED for sentence in parts[name][side]}
            pool = [sentence for sentence in dict.fromkeys(pool) if sentence.strip() and sentence not in taken]
            if not pool:
                raise UserError(
                    f"no monolingual {lang} text: give data.{'source' if side == SOURCE else 'target'}_text a source, "
                    "or give data.source more pairs than paired_size + val_size + test_size"
                )
            parts[lang] = datasets.Dataset.from_dict({TEXT: pool})
        return parts

    def prepare_data(self) -> None:
        """Cut the pairs and pools, train the tokenizer and encode everything, unless the cache has it."""
        if self.tokenizer_path.exists() and (self.tokens_dir() / "stats.json").exists():
            return
        self._train_tokenizer()
        tokenizer = load_tokenizer(self.tokenizer_path)
        limit, truncate = self.context_length, self.overlong == "truncate"
        stats = {}
        for name, encoded in self._encoded(tokenizer, limit, truncate):
            stats[name] = {"rows": len(encoded), "tokens": int(sum(encoded["length"])) if len(encoded) else 0}
            with atomic_directory(self.tokens_dir() / name) as directory:
                encoded.save_to_disk(str(directory))
        write_json_atomic(self.tokens_dir() / "stats.json", stats)

    def _encoded(self, tokenizer: Tokenizer, limit: int, truncate: bool) -> Iterator[tuple[str, datasets.Dataset]]:
        corpora = self.corpora
        for lang in self.languages:
            yield lang, _encode_text(corpora[lang], tokenizer, limit, truncate)
        for name in PAIRED:
            for direction, pairs in zip(self.directions, (corpora[name], _swapped(corpora[name]))):
                encoded = encode_pairs(pairs, tokenizer, tokenizer, limit, truncate)
                if len(encoded):  # an empty set (no pairs: a cold start) has no columns
                    encoded = encoded.rename_column("target_length", "length")
                yield f"{name}-{direction}", encoded

    def _train_tokenizer(self) -> None:
        with one_at_a_time(self.tokenizer_path):
            if self.tokenizer_path.exists():
                return
            corpora = self.corpora
            paired = corpora["paired"]

            def texts() -> Iterator[list[str]]:
                for lang in self.languages:
                    yield from (batch[TEXT] for batch in corpora[lang].iter(batch_size=ENCODE_BATCH))
                for column in (SOURCE, TARGET):
                    yield from (batch[column] for batch in paired.iter(batch_size=ENCODE_BATCH))

            save_tokenizer(train_tokenizer(texts(), self.vocab_size), self.tokenizer_path)

    def stats(self) -> dict[str, dict[str, int]]:
        return json.loads((self.tokens_dir() / "stats.json").read_text())

    def stats_table(self) -> str:
        rows = [f"{'set':<16} {'rows':>9} {'target tokens':>14}"]
        rows += [f"{name:<16} {s['rows']:>9,} {s['tokens']:>14,}" for name, s in self.stats().items()]
        return "\n".join(rows)

    def setup(self, stage: str) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        stats = self.stats()
        wanted = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage)
        if wanted is None:
            raise UserError("the cycle data has no predict split: translate with ./infer.py --direction")
        names = [f"{split}-{d}" for split in wanted for d in self.directions]
        if stage == "fit":
            names += [*self.languages, *(f"paired-{d}" for d in self.directions)]
        for name in names:
            if stats[name]["rows"] == 0 and name.startswith("paired"):
                continue  # no pairs: cycle training alone (a cold start)
            if stats[name]["rows"] == 0:
                raise UserError(
                    f"the {name} set has nothing within {self.context_length} tokens: raise data.context_length, "
                    "or set data.overlong to truncate"
                )
            self.datasets[name] = datasets.load_from_disk(str(self.tokens_dir() / name))

    def train_dataloader(self) -> "PoolStreams":
        world_size, rank = self.world()
        pools: dict[str, tuple[Dataset, int, Callable[[list[Any]], Any]]] = {
            lang: (self.datasets[lang], self.batch_size, collate_text) for lang in self.languages
        }
        for direction in self.directions:
            paired = self.datasets.get(f"paired-{direction}")
            if paired is not None:
                pools[direction] = (paired, min(self.paired_batch_size, len(paired)), collate_pairs)
        return PoolStreams(pools, self.seed, rank, world_size)

    def val_dataloader(self) -> list[DataLoader]:
        return [self.evaluation_loader(f"val-{direction}") for direction in self.directions]

    def test_dataloader(self) -> list[DataLoader]:
        return [self.evaluation_loader(f"test-{direction}") for direction in self.directions]

    def predict_dataloader(self) -> DataLoader:
        raise UserError("the cycle data has no predict split: translate with ./infer.py --direction")

    @staticmethod
    def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)


def _unique_on_both_sides(pairs: datasets.Dataset) -> datasets.Dataset:
    """The pairs whose source and whose target are each the first of their text, so that no sentence of one
    language is in two sets (an Italian year and cardinal can be the same words)."""
    seen: dict[str, set[str]] = {SOURCE: set(), TARGET: set()}
    keep = []
    for index, (source, target) in enumerate(zip(pairs[SOURCE], pairs[TARGET])):
        if source not in seen[SOURCE] and target not in seen[TARGET]:
            keep.append(index)
        seen[SOURCE].add(source)
        seen[TARGET].add(target)
    return pairs.select(keep)


def _swapped(pairs: datasets.Dataset) -> datasets.Dataset:
    return pairs.rename_columns({SOURCE: "_", TARGET: SOURCE}).rename_column("_", TARGET)


def _sentences(source: TextSource, lang: str) -> list[str]:
    text = source.load()
    if len(text) == 0:
        raise UserError(f"the {lang} text source {type(source).__name__} has no text: point it at some")
    return [line.strip() for line in text[TEXT]]


def _encode_text(texts: datasets.Dataset, tokenizer: Tokenizer, limit: int, truncate: bool) -> datasets.Dataset:
    """Each sentence's tokens (without start or end) within ``limit`` - 1, its text and token count."""

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        rows = [(e.ids[: limit - 1], t) for e, t in zip(tokenizer.encode_batch(batch[TEXT]), batch[TEXT])]
        rows = [(ids, t) for ids, t in rows if ids and (truncate or len(ids) < limit)]
        return {"ids": [ids for ids, _ in rows], "text": [t for _, t in rows], "length": [len(i) + 1 for i, _ in rows]}

    return texts.map(encode, batched=True, batch_size=ENCODE_BATCH, remove_columns=[TEXT], desc="Encoding text")


def collate_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of monolingual sentences: token id lists (decoded by the engine, so kept unpadded) and texts."""
    return {"ids": [list(item["ids"]) for item in items], "text": [item["text"] for item in items]}


def source_ids(ids: list[int]) -> list[int]:
    """What the encoder reads of a sentence: its tokens, then end-of-sequence."""
    return [*ids, EOS_ID]


class PoolStreams:
    """Endless training batches: each step one batch from every pool, each pool its own shuffled stream.

    A pool is gone through in a seeded permutation, a new one each pass, and continues into the
    next pass inside a batch, so no pool waits for another and none stops the others (as a zip
    stopping at the shortest would). Under DDP each process takes every ``world_size``-th item of
    each permutation. ``state_dict`` is the items taken from each pool, from which the position in
    every stream follows, so a resumed run continues with the very next batch. It leaves out the
    last ``ahead`` batches handed out: Lightning's loop fetches one batch ahead of the one it trains
    from an iterable without a length, as this one is (endless).
    """

    def __init__(
        self,
        pools: dict[str, tuple[Dataset, int, Callable[[list[Any]], Any]]],
        seed: int,
        rank: int,
        world_size: int,
        ahead: int = 1,
    ):
        self.pools, self.seed, self.rank, self.world_size = pools, seed, rank, world_size
        self.taken = {name: 0 for name in pools}
        self.orders: dict[tuple[str, int], np.ndarray] = {}
        self.history: deque[dict[str, int]] = deque([dict(self.taken)], maxlen=ahead + 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.history.clear()
        self.history.append(dict(self.taken))
        while True:
            batch = {name: collate(self._take(name, size)) for name, (_, size, collate) in self.pools.items()}
            self.history.append(dict(self.taken))
            yield batch

    def _take(self, name: str, size: int) -> list[Any]:
        dataset = self.pools[name][0]
        per_pass = len(range(self.rank, len(dataset), self.world_size))
        if per_pass == 0:
            raise UserError(f"the {name} set has fewer rows than processes: add data or use fewer processes")
        items = []
        for position in range(self.taken[name], self.taken[name] + size):
            items.append(dataset[int(self._order(name, position // per_pass)[position % per_pass])])
        self.taken[name] += size
        return items

    def _order(self, name: str, epoch: int) -> np.ndarray:
        if (name, epoch) not in self.orders:
            self.orders = {key: order for key, order in self.orders.items() if key[0] != name}
            rng = np.random.default_rng((self.seed, list(self.pools).index(name), epoch))
            self.orders[name, epoch] = rng.permutation(len(self.pools[name][0]))[self.rank :: self.world_size]
        return self.orders[name, epoch]

    def state_dict(self) -> dict[str, Any]:
        """The items each pool had given when the last batch trained on was drawn."""
        return {"taken": dict(self.history[0])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = {name: state["taken"].get(name, 0) for name in self.pools}
        self.history.clear()
        self.history.append(dict(self.taken))
