"""Reading training checkpoints safely: tensors and plain containers only, never arbitrary objects."""

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from xlab.errors import UserError
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Decoder, Tokenizer]:
    """The language model and tokenizer of a training checkpoint, in eval mode on ``device``."""
    checkpoint = read_checkpoint(path)
    arch = checkpoint.get("hyper_parameters", {}).get("arch")
    tokenizer_json = next(
        (v["tokenizer"] for v in checkpoint.values() if isinstance(v, dict) and "tokenizer" in v), None
    )
    if arch is None or tokenizer_json is None:
        raise UserError(f"{path} is not an XLab language-model checkpoint: it has no architecture or tokenizer")
    model = Decoder(TransformerConfig(**arch))
    prefix = "model."
    weights = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise UserError(f"{path}: its weights do not match its recorded architecture") from None
    return model.to(device).eval(), Tokenizer.from_str(tokenizer_json)
