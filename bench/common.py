"""What the benchmarks share: model-shape options, the transformers reference, the device, CUDA-aware timing."""

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from xlab.files import write_json_atomic
from xlab.models.config import TransformerConfig


def logged_values(metrics_csv: Path, column: str) -> list[float]:
    """Every value of ``column`` a run logged to its metrics.csv, in order (none if it never logged one)."""
    with metrics_csv.open(newline="", encoding="utf-8") as file:
        return [float(row[column]) for row in csv.DictReader(file) if row.get(column)]


def last_value(metrics_csv: Path, column: str) -> float:
    """The last logged value of ``column`` in a run's metrics.csv, or exit naming the file and the column."""
    values = logged_values(metrics_csv, column)
    if not values:
        sys.exit(f"error: {metrics_csv} has no {column}")
    return values[-1]


def saved_result(path: Path, settings: list[str], compute: Callable[[], dict]) -> dict:
    """``compute()``, saved at ``path`` with the ``settings`` it ran with, or read back from there when a run of the
    same settings saved it (so a long experiment can be resumed); a saved run of other settings is an error."""
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier["settings"] != settings:
            settings_then = " ".join(earlier["settings"])
            sys.exit(f"error: {path} was run with other settings ({settings_then}): start a new --workdir or --tag")
        return earlier["result"]
    result = compute()
    write_json_atomic(path, {"settings": settings, "result": result})
    return result


def add_model_arguments(parser: argparse.ArgumentParser, context: int, layers: int = 4, vocab: int = 4096) -> None:
    """The model's shape (the default experiment's, with the given context) and the device."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=context)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def model_config(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab,
        context_length=args.context,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
    )


def transformers_and_device(device_flag: str) -> tuple[str, torch.device]:
    """The installed transformers version and the device to run on; exits with one line if either is missing."""
    try:
        import transformers
    except ImportError:
        sys.exit("error: transformers is not installed: pip install -r bench/requirements.txt")
    return transformers.__version__, pick_device(device_flag)


def pick_device(device_flag: str) -> torch.device:
    """The device ``--device`` names (auto: CUDA when there is one); exits with one line if it is missing."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch.cuda is not available")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(run: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``run()``, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


class OtherLoad:
    """While open, how much of the machine's CPU other processes took: ``share`` of all cores (0 to 1).

    Read from Linux's /proc/stat (every process's busy time, steal included) less this process's
    own CPU time; ``share`` stays None where /proc/stat is missing.
    """

    share: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._start = (_machine_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        machine, own, wall = _machine_busy_seconds(), time.process_time(), time.perf_counter()
        if machine is not None and self._start[0] is not None:
            others = (machine - self._start[0]) - (own - self._start[1])
            self.share = min(1.0, max(0.0, others / ((wall - self._start[2]) * (os.cpu_count() or 1))))

    def warning(self) -> str | None:
        """A line to print when other processes took more than a tenth of the cores."""
        if self.share is None or self.share <= 0.1:
            return None
        return (
            f"warning: other processes used {self.share:.0%} of the {os.cpu_count()} cores during the timed runs: "
            "every column is slowed, and the ratios are noisier than on an idle machine"
        )


def _machine_busy_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
