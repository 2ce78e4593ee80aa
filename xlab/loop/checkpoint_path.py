"""Where a run's ``last.ckpt`` is: one answer for every part of XLab that writes or resumes from it."""

from pathlib import Path

from lightning.pytorch import Trainer

LAST_CHECKPOINT = "last.ckpt"


def last_checkpoint_path(trainer: Trainer) -> Path:
    """``last.ckpt`` in the checkpoint callback's directory, or in ``trainer.default_root_dir`` without one.

    Before ``ModelCheckpoint`` has resolved its directory (its ``setup``), the directory it will resolve:
    ``checkpoints`` in the run's log directory.
    """
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None:
        return Path(trainer.default_root_dir) / LAST_CHECKPOINT
    if checkpoint.dirpath:
        return Path(checkpoint.dirpath) / LAST_CHECKPOINT
    return Path(trainer.log_dir) / "checkpoints" / LAST_CHECKPOINT
