"""``MetricsCSV``: every logged metric in ``metrics.csv`` beside the TensorBoard events."""

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only


class MetricsCSV(Logger):
    """Every logged metric in one CSV file, one row per step, for tools that do not read TensorBoard.

    A step's row is written, and the file closed, as soon as a later step logs: a crash loses at most the
    step in progress. An existing file is continued, never replaced: a resumed run appends its rows (a step
    that the interrupted run logged after its checkpoint then appears twice; the later row is the one that
    counts), and a metric that first appears later widens the header, rewriting the file once.
    """

    FILE_NAME = "metrics.csv"

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.columns: list[str] = []
        self.row: dict[str, float] = {}
        self.step: int | None = None

    @property
    def name(self) -> str:
        return "metrics_csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: hyperparameters are in the run's config.yaml and in TensorBoard."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is not None and step != self.step:
            self._write_row()
            self.step = step
        self.row.update({name: float(value) for name, value in metrics.items()})

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._write_row()
        self.step = None

    def _write_row(self) -> None:
        if not self.row:
            return
        row = {"step": self.step, **self.row}
        self.row = {}
        if not self.columns and self.path.exists():
            with self.path.open(newline="") as file:
                self.columns = next(csv.reader(file), [])
        if not set(row) <= set(self.columns):
            self.columns = ["step", *sorted((set(self.columns) | set(row)) - {"step"})]
            self._rewrite_with_header()
        with self.path.open("a", newline="") as file:
            csv.DictWriter(file, self.columns).writerow(row)

    def _rewrite_with_header(self) -> None:
        rows = []
        if self.path.exists():
            with self.path.open(newline="") as file:
                rows = list(csv.DictReader(file))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".tmp")
        with partial.open("w", newline="") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.path)
