"""``./xlab.py predict`` writes what the model returns for the predict split to a JSON Lines file."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from xlab.files import atomic_path


class WritePredictions(BasePredictionWriter):
    """One JSON object per example in ``predictions.jsonl`` of the run directory (``predictions.rankN.jsonl``
    per process under DDP), written whole or not at all.

    XLab's DataModules have one predict loader. A batch's prediction is either a list of
    per-example dicts (the translator) or a dict of per-example tensors (the language
    model's loss and bits per byte per sequence).
    """

    def __init__(self):
        super().__init__(write_interval="epoch")
        self.written: Path | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = Path(trainer.log_dir or trainer.default_root_dir) / f"predictions{suffix}.jsonl"
        with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as file:
            for batch in predictions:
                for row in rows(batch):
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.written = path


def rows(batch: list[dict[str, Any]] | dict[str, Tensor]) -> list[dict[str, Any]]:
    """Per-example dicts from either form of a batch's prediction."""
    if isinstance(batch, list):
        return batch
    columns = {name: values.tolist() for name, values in batch.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]
