"""Where text comes from: the embedded Python documentation, local files, or a hub dataset.

Every source returns a ``datasets.Dataset`` with one ``text`` column, one document a row,
and a ``cache_key`` that changes whenever the text it would load could change.
"""

import ast
import glob
import hashlib
import os
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import datasets

from xlab.errors import UserError

TEXT = "text"


class TextSource(ABC):
    """A collection of documents."""

    @abstractmethod
    def load(self) -> datasets.Dataset:
        """The documents, one per row of a ``text`` column, in a fixed order."""

    @abstractmethod
    def cache_key(self) -> str:
        """A short file-name-safe string identifying exactly this text."""


class PythonDocs(TextSource):
    """The documentation that ships with every Python interpreter, about 1.9 MB of English.

    Documents are the ``pydoc_data`` help topics and the docstrings of the standard
    library's modules, classes and functions, read from source with ``ast`` (no module is
    imported). The text is identical for a given Python version, so it needs no download.
    """

    def __init__(self, min_chars: int = 40):
        self.min_chars = min_chars

    def load(self) -> datasets.Dataset:
        return datasets.Dataset.from_dict({TEXT: list(self.documents())})

    def documents(self) -> Iterator[str]:
        from pydoc_data.topics import topics

        yield from (topics[name] for name in sorted(topics))
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(root.rglob("*.py")):
            if not _is_library_module(path.relative_to(root)):
                continue
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > self.min_chars:
                        yield doc

    def cache_key(self) -> str:
        return f"pydocs-{sys.implementation.name}{'.'.join(map(str, sys.version_info[:3]))}-{self.min_chars}"


_SKIPPED_PACKAGES = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}


def _is_library_module(relative: Path) -> bool:
    return not _SKIPPED_PACKAGES.intersection(relative.parts)


class LocalFiles(TextSource):
    """Local text, JSON Lines or CSV files, by path or glob pattern.

    Text files give one document per file, paragraph (blank-line separated) or line, by
    ``sample_by``; JSON Lines and CSV files give one document per record, read from ``column``.
    """

    def __init__(
        self,
        paths: list[str],
        sample_by: Literal["document", "paragraph", "line"] = "document",
        column: str = TEXT,
    ):
        self.paths = paths
        self.sample_by = sample_by
        self.column = column

    def files(self) -> list[str]:
        if not self.paths:
            raise UserError("data.source.init_args.paths is empty: name at least one file or glob")
        found = []
        for pattern in self.paths:
            matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            if not matches:
                raise UserError(f"no file matches '{pattern}' (data.source.init_args.paths)")
            found.extend(m for m in matches if os.path.isfile(m))
        return found

    def load(self) -> datasets.Dataset:
        files = self.files()
        builders = {_builder(f) for f in files}
        if len(builders) > 1:
            raise UserError(
                f"data.source.init_args.paths mixes file kinds ({', '.join(sorted(builders))}): use one kind"
            )
        builder = builders.pop()
        if all(os.path.getsize(name) == 0 for name in files):
            raise UserError(f"every file named by data.source.init_args.paths is empty: {', '.join(self.paths)}")
        options = {"sample_by": self.sample_by} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=files, split="train", **options)
        return _select_text(dataset, self.column if builder != "text" else TEXT, "data.source.init_args.column")

    def cache_key(self) -> str:
        digest = hashlib.sha256(repr((self.sample_by, self.column)).encode())
        for name in self.files():
            stat = os.stat(name)
            digest.update(f"{os.path.abspath(name)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return f"files-{digest.hexdigest()[:16]}"


def _builder(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(suffix, "text")


class HubDataset(TextSource):
    """A dataset from the Hugging Face hub (or any ``datasets.load_dataset`` path), one document per row."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        column: str = TEXT,
        revision: str | None = None,
    ):
        self.path = path
        self.name = name
        self.split = split
        self.column = column
        self.revision = revision

    def load(self) -> datasets.Dataset:
        dataset = datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision)
        return _select_text(dataset, self.column, "data.source.init_args.column")

    def cache_key(self) -> str:
        parts = (self.path, self.name, self.split, self.column, self.revision)
        readable = "-".join(str(p) for p in parts[:3] if p).replace("/", "_")
        return f"hub-{readable}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"


def _select_text(dataset: datasets.Dataset, column: str, setting: str) -> datasets.Dataset:
    if column not in dataset.column_names:
        raise UserError(f"column '{column}' not found (has: {', '.join(dataset.column_names)}): set {setting}")
    dataset = dataset.select_columns([column])
    return dataset.rename_column(column, TEXT) if column != TEXT else dataset
