"""Shared fixtures: a small local corpus and helpers to run the CLI in a temporary directory."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from xlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the model learns to predict the next token from the tokens before it while attention mixes "
    "information across positions and the optimizer follows the gradient of the loss downhill"
).split()


def write_corpus(directory: Path, documents: int = 120, seed: int = 0) -> Path:
    """Plain-text files, one document each, of pseudo-random English-like sentences."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        sentences = (" ".join(rng.choices(WORDS, k=rng.randint(5, 15))).capitalize() + "." for _ in range(12))
        (directory / f"doc{index:04d}.txt").write_text(" ".join(sentences) + "\n")
    return directory


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def tiny_args(corpus: Path, *extra: str) -> list[str]:
    """Overrides that train the defaults.yaml model on a local corpus in a couple of seconds."""
    return [
        "--data.init_args.source=xlab.data.sources.LocalFiles",
        f"--data.init_args.source.init_args.paths=[{corpus}/*.txt]",
        "--data.init_args.context_length=32",
        "--data.init_args.vocab_size=300",
        "--data.init_args.batch_size=8",
        "--trainer.max_steps=10",
        "--trainer.val_check_interval=5",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working directory, so runs/ and cache/ land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(*args: str) -> int:
    """Run ./xlab.py in this process (fast); returns the exit code."""
    return main(list(args))


def run_script(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the executables as a user would, in a separate process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
