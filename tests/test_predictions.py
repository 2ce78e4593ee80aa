"""./xlab.py predict writes the language model's per-sequence scores to predictions.jsonl."""

import json
import math
from pathlib import Path

import numpy as np

from tests.conftest import run_cli, tiny_args


def test_language_model_predict_writes_one_row_per_sequence(in_tmp: Path, corpus: Path, capsys):
    assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=3")) == 0
    checkpoint = in_tmp / "runs" / "defaults" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert run_cli("predict", *tiny_args(corpus), f"--ckpt_path={checkpoint}") == 0
    assert "wrote runs/defaults/predictions.jsonl" in capsys.readouterr().out
    rows = [json.loads(line) for line in (in_tmp / "runs" / "defaults" / "predictions.jsonl").read_text().splitlines()]
    tokens = len(np.load(next((in_tmp / "cache").glob("*/tokens-*/predict.npy")), mmap_mode="r"))
    assert len(rows) == (tokens - 1) // 32
    assert all(set(row) == {"loss", "bits_per_byte"} and math.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
