"""The two training loops bench/train_throughput.py sets beside the bare model step.

``plain_loop_step``: what a user who leaves Lightning would write, in nanoGPT's shape: random windows
of a memmapped token file, the learning rate set each step, forward, loss, backward, gradient
clipping, AdamW, gradients set to None; no logging. ``fit_tokens_per_second``: the whole
``./xlab.py fit -c conf/classic.yaml`` command at the same shape, read from its own logging.
"""

import argparse
import csv
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xlab.checkpoint import recorded_network
from xlab.models.losses import next_token_loss
from xlab.models.schedule import WarmupDecay

ROOT = Path(__file__).resolve().parents[1]
CLIP = 1.0  # conf/defaults.yaml's trainer.gradient_clip_val


def token_file(directory: Path, vocab: int, tokens: int = 4_000_000) -> Path:
    """A file of random uint16 tokens, as nanoGPT's prepare scripts write ``train.bin``."""
    path = directory / "train.bin"
    np.random.default_rng(0).integers(vocab, size=tokens, dtype=np.uint16).tofile(path)
    return path


def plain_loop_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupDecay,
    tokens: Path,
    batch: int,
    context: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> Callable[[], None]:
    """One step of the plain loop per call, its batch read from ``tokens`` each time."""
    data = np.memmap(tokens, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    step_index = 0

    def step() -> None:
        nonlocal step_index
        starts = rng.integers(len(data) - context - 1, size=batch)
        window = torch.from_numpy(np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64))
        inputs, targets = window[:, :-1].to(device), window[:, 1:].to(device)
        for group, peak in zip(optimizer.param_groups, peak_lrs):
            group["lr"] = peak * schedule(step_index)
        with autocast():
            logits = model(inputs)
        loss = next_token_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_index += 1

    return step


def fit_tokens_per_second(args: argparse.Namespace, steps: int, warmup: int, *extra: str) -> tuple[float, int]:
    """``train/tokens_per_sec`` as ``./xlab.py fit -c conf/classic.yaml`` logs it (the median of the values logged
    over windows that lie wholly after ``warmup`` steps), at the shape of ``args``, without dropout or
    validation; and the vocabulary its tokenizer has. Runs in a temporary directory (data, runs)."""
    window = 20  # xlab.callbacks.TokensPerSecond's
    log_every = 5
    shape = [
        f"--model.init_args.arch.n_layers={args.layers}",
        f"--model.init_args.arch.d_model={args.d_model}",
        f"--model.init_args.arch.n_heads={args.heads}",
        "--model.init_args.arch.dropout=0.0",
        f"--data.init_args.context_length={args.context}",
        f"--data.init_args.vocab_size={args.vocab}",
        f"--data.init_args.batch_size={args.batch}",
    ]
    run = [
        f"--trainer.max_steps={warmup + window + steps}",
        f"--trainer.log_every_n_steps={log_every}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"--trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
    ]
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, str(ROOT / "xlab.py"), "fit", "-c", str(ROOT / "conf" / "classic.yaml"), *shape]
        subprocess.run([*command, *run, *extra], cwd=directory, check=True, capture_output=True, text=True)
        run_dir = Path(directory) / "runs" / "classic"
        rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
        vocab = recorded_network(run_dir / "checkpoints" / "last.ckpt")["arch"]["vocab_size"]
    rates = [
        float(row["train/tokens_per_sec"])
        for row in rows
        if row.get("train/tokens_per_sec") and int(row["step"]) + 1 >= warmup + window
    ]
    return (statistics.median(rates) if rates else math.nan), vocab
