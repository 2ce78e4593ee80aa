"""Atomic writes: every file a user keeps appears whole or not at all."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; put it in ``path``'s place only if the block succeeds.

    A directory cannot be renamed over a non-empty one, so an existing ``path`` is first moved
    aside and deleted once the new one is in place: whatever fails, ``path`` is the old or the
    new version, never a mix (it is missing only between the two renames).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    previous = path.with_name(f".{path.name}.{os.getpid()}.old")
    _remove(temporary)
    temporary.mkdir()
    try:
        yield temporary
        if path.exists() or path.is_symlink():
            _remove(previous)
            os.replace(path, previous)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.replace(previous, path)
                raise
            _remove(previous)
        else:
            os.replace(temporary, path)
    finally:
        _remove(temporary)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_json_atomic(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, indent=2).encode())


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
