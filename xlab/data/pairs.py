"""Where parallel text comes from: embedded number phrases, local TSV / JSONL files, or a hub dataset.

Every source returns a ``datasets.Dataset`` with ``source`` and ``target`` string columns,
one sentence pair a row, and a ``cache_key`` that changes whenever the pairs it loads could.
"""

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import datasets
from num2words import CONVERTER_CLASSES, num2words

from xlab.data.sources import LocalFiles
from xlab.errors import UserError

SOURCE, TARGET = "source", "target"
PhraseKind = Literal["cardinal", "ordinal", "year", "currency"]


class PairSource(ABC):
    """A collection of sentence pairs."""

    @abstractmethod
    def load(self) -> datasets.Dataset:
        """The pairs, as ``source`` and ``target`` columns, in a fixed order."""

    @abstractmethod
    def cache_key(self) -> str:
        """A short file-name-safe string identifying exactly these pairs."""


class NumberPhrases(PairSource):
    """Numbers written out in two languages by ``num2words``: exact parallel pairs, no download.

    Each pair is one number as a cardinal ("three hundred and twelve" / "trecentododici"),
    an ordinal, a year or a euro amount, drawn with ``seed``: magnitudes are spread evenly
    over 1 to 6 digits (cardinals), 1 to 4 digits (ordinals), years 1000 to 2099, amounts
    below 10,000 euro with cents. Pairs with the same source text are kept once, so no
    sentence is in two splits.
    """

    def __init__(
        self,
        source_lang: str = "en",
        target_lang: str = "it",
        size: int = 40_000,
        kinds: tuple[PhraseKind, ...] = ("cardinal", "ordinal", "year", "currency"),
        seed: int = 0,
    ):
        for lang in (source_lang, target_lang):
            if lang not in CONVERTER_CLASSES:
                raise UserError(
                    f"num2words has no language '{lang}': pick one of {', '.join(sorted(CONVERTER_CLASSES))}"
                )
        if size < 1 or not kinds:
            raise UserError("data.source NumberPhrases needs size >= 1 and at least one of kinds")
        self.source_lang, self.target_lang = source_lang, target_lang
        self.size, self.kinds, self.seed = size, tuple(kinds), seed

    def load(self) -> datasets.Dataset:
        pairs: dict[str, str] = {}
        rng = random.Random(self.seed)
        attempts = 0
        while len(pairs) < self.size and attempts < 20 * self.size:
            attempts += 1
            kind = self.kinds[attempts % len(self.kinds)]
            value = _DRAW[kind](rng)
            source, target = (self._say(value, kind, lang) for lang in (self.source_lang, self.target_lang))
            pairs.setdefault(source, target)
        return datasets.Dataset.from_dict({SOURCE: list(pairs), TARGET: list(pairs.values())})

    @staticmethod
    def _say(value: int | float, kind: str, lang: str) -> str:
        if kind == "currency":
            return num2words(value, lang=lang, to="currency", currency="EUR")
        return num2words(value, lang=lang, to=kind)

    def cache_key(self) -> str:
        kinds = "-".join(self.kinds)
        return f"numbers-{self.source_lang}-{self.target_lang}-{kinds}-{self.size}-seed{self.seed}"


def _digits(rng: random.Random, low: int, high: int) -> int:
    """A number of ``low`` to ``high`` digits, each length equally likely."""
    length = rng.randint(low, high)
    return rng.randint(0 if length == 1 else 10 ** (length - 1), 10**length - 1)


_DRAW: dict[str, Callable[[random.Random], int | float]] = {
    "cardinal": lambda rng: _digits(rng, 1, 6),
    "ordinal": lambda rng: max(1, _digits(rng, 1, 4)),
    "year": lambda rng: rng.randint(1000, 2099),
    "currency": lambda rng: round(_digits(rng, 1, 4) + rng.randint(0, 99) / 100, 2),
}


class ParallelFiles(PairSource):
    """Local pairs: TSV files (source, a tab, target on each line) or JSON Lines with two fields."""

    def __init__(self, paths: list[str], source_field: str = SOURCE, target_field: str = TARGET):
        self.files = LocalFiles(paths)
        self.source_field, self.target_field = source_field, target_field

    def load(self) -> datasets.Dataset:
        names = self.files.files()
        if all(Path(name).suffix.lower() in (".jsonl", ".json") for name in names):
            dataset = datasets.load_dataset("json", data_files=names, split="train")
            return _select_pair(dataset, self.source_field, self.target_field)
        if any(Path(name).suffix.lower() in (".jsonl", ".json") for name in names):
            raise UserError("data.source.init_args.paths mixes JSON Lines and TSV files: use one kind")
        return datasets.Dataset.from_dict(_read_tsv(names))

    def cache_key(self) -> str:
        fields = hashlib.sha256(repr((self.source_field, self.target_field)).encode()).hexdigest()[:6]
        return f"pairs-{self.files.cache_key()}-{fields}"


def _read_tsv(names: list[str]) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = {SOURCE: [], TARGET: []}
    for name in names:
        for number, line in _lines(name):
            parts = line.split("\t")
            if len(parts) != 2:
                raise UserError(f"{name}:{number}: expected source<TAB>target, found {len(parts)} tab-separated fields")
            columns[SOURCE].append(parts[0].strip())
            columns[TARGET].append(parts[1].strip())
    return columns


def _lines(name: str) -> Iterator[tuple[int, str]]:
    with open(name, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                yield number, line.rstrip("\n")


class HubPairs(PairSource):
    """A hub dataset of pairs (or any ``datasets.load_dataset`` path): either a ``translation`` column
    of {language: text} records, as ``opus_books`` has, or two text columns named by the languages."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        source_lang: str = "en",
        target_lang: str = "it",
        revision: str | None = None,
    ):
        self.path, self.name, self.split, self.revision = path, name, split, revision
        self.source_lang, self.target_lang = source_lang, target_lang

    def load(self) -> datasets.Dataset:
        dataset = datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision)
        if "translation" not in dataset.column_names:
            return _select_pair(dataset, self.source_lang, self.target_lang)
        langs = (self.source_lang, self.target_lang)

        def unpack(batch: dict[str, list]) -> dict[str, list[str]]:
            return {
                column: [record[lang] for record in batch["translation"]]
                for column, lang in zip((SOURCE, TARGET), langs)
            }

        return dataset.map(unpack, batched=True, remove_columns=dataset.column_names)

    def cache_key(self) -> str:
        parts = (self.path, self.name, self.split, self.source_lang, self.target_lang, self.revision)
        readable = "-".join(str(p) for p in parts[:5] if p).replace("/", "_")
        return f"hub-{readable}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"


def _select_pair(dataset: datasets.Dataset, source: str, target: str) -> datasets.Dataset:
    missing = [column for column in (source, target) if column not in dataset.column_names]
    if missing:
        raise UserError(
            f"column {missing[0]!r} not found (has: {', '.join(dataset.column_names)}): "
            "set data.source.init_args.source_field / target_field (or source_lang / target_lang)"
        )
    dataset = dataset.select_columns([source, target])
    return dataset.rename_columns({source: f"_{SOURCE}", target: f"_{TARGET}"}).rename_columns(
        {f"_{SOURCE}": SOURCE, f"_{TARGET}": TARGET}
    )
