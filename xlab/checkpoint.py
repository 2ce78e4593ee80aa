"""Reading training checkpoints safely: tensors and plain containers only, never arbitrary objects."""

from pathlib import Path
from typing import Any

import torch

from xlab.errors import UserError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``; a UserError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint: it is truncated, corrupt or not a checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an XLab training checkpoint: it has no state_dict")
    return checkpoint
