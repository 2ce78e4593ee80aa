"""Checkpoints and exports: the one place models are read from files and exports are written
(exports for Hugging Face transformers: xlab/hf.py, from what ``load`` returns).

A training checkpoint is Lightning's file, read with ``torch.load(weights_only=True)``. An
export is one safetensors file: the weights plus metadata (architecture and training progress
as JSON, the tokenizer's JSON xz-compressed in base64), read with no unpickling at all.
"""

import base64
import json
import lzma
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from xlab.errors import UserError
from xlab.files import atomic_path
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.encoder_decoder import EncoderDecoder, TorchEncoderDecoder

EXPORT_FORMAT = "xlab-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED_WEIGHT = "head.weight"
NETWORKS = {network.__name__: network for network in (Decoder, EncoderDecoder, TorchEncoderDecoder)}
Network = Decoder | EncoderDecoder


@dataclass
class LoadedModel:
    """A model with its tokenizer and what is known of its training (step, tokens, metrics).

    ``tokenizer`` is the one the model writes with; a translator also has the ``source_tokenizer``
    its encoder reads with (the same object when the two sides share one).
    """

    model: Network
    tokenizer: Tokenizer
    training: dict[str, Any] = field(default_factory=dict)
    source_tokenizer: Tokenizer | None = None

    def __post_init__(self) -> None:
        if self.is_translator and self.source_tokenizer is None:
            self.source_tokenizer = self.tokenizer

    @property
    def is_translator(self) -> bool:
        return isinstance(self.model, EncoderDecoder)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``; a UserError if it is missing or unreadable."""
    path = _existing(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint: it is truncated, corrupt or not a checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not an XLab training checkpoint: it has no state_dict")
    return checkpoint


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Network, Tokenizer]:
    """The model and (target) tokenizer of a training checkpoint or an export, in eval mode on ``device``."""
    loaded = load(path)
    return loaded.model.to(device).eval(), loaded.tokenizer


def load(path: str | Path) -> LoadedModel:
    """A training checkpoint or an export, told apart by content, not by name."""
    path = _existing(path)
    return _load_export(path) if is_export(path) else _load_training_checkpoint(path)


def is_export(path: Path) -> bool:
    """Whether the file starts like safetensors: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    return path


def _load_training_checkpoint(path: Path) -> LoadedModel:
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {})
    data = next((v for v in checkpoint.values() if isinstance(v, dict) and "tokenizer" in v), None)
    if hparams.get("arch") is None or data is None:
        raise UserError(f"{path} is not an XLab model checkpoint: it has no architecture or tokenizer")
    prefix = "model."
    weights = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model = _build(path, TransformerConfig(**hparams["arch"]), weights, hparams.get("network", Decoder.__name__))
    tokenizer, source = _tokenizers(data["tokenizer"], data.get("source_tokenizer"))
    return LoadedModel(model, tokenizer, _training_progress(checkpoint), source)


def _tokenizers(target: str, source: str | None) -> tuple[Tokenizer, Tokenizer | None]:
    tokenizer = Tokenizer.from_str(target)
    if source is None:
        return tokenizer, None
    return tokenizer, tokenizer if source == target else Tokenizer.from_str(source)


def _training_progress(checkpoint: dict[str, Any]) -> dict[str, Any]:
    progress = {key: checkpoint[key] for key in ("global_step", "epoch", "tokens_seen") if key in checkpoint}
    for state in checkpoint.get("callbacks", {}).values():
        if state.get("best_model_score") is not None:
            progress[f"best {state['monitor']}"] = float(state["best_model_score"])
    return progress


def _build(path: Path, config: TransformerConfig, weights: dict[str, torch.Tensor], network: str) -> Network:
    if network not in NETWORKS:
        raise UserError(f"{path} holds a {network}, which this XLab cannot build: update XLab")
    model = NETWORKS[network](config)
    if config.tie_embeddings:
        weights = {name: tensor for name, tensor in weights.items() if name != TIED_WEIGHT}
    model.to(next(iter(weights.values())).dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - ({TIED_WEIGHT} if config.tie_embeddings else set()):
        raise UserError(f"{path}: its weights do not match its recorded architecture")
    return model


def architecture(path: str | Path) -> dict[str, Any] | None:
    """The recorded architecture (TransformerConfig fields) of a checkpoint or export, None if it has none."""
    path = _existing(path)
    if is_export(path):
        return json.loads(_export_metadata(path)["arch"])
    return read_checkpoint(path).get("hyper_parameters", {}).get("arch")


def _export_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        raise UserError(f"{path} is not a readable export: it is truncated or corrupt") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is a safetensors file but not an XLab export (format {metadata.get('format')!r})")
    return metadata


def _load_export(path: Path) -> LoadedModel:
    metadata = _export_metadata(path)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise UserError(f"{path} is not a readable export: it is truncated or corrupt") from None
    network = metadata.get("network", Decoder.__name__)
    model = _build(path, TransformerConfig(**json.loads(metadata["arch"])), weights, network)
    target = _unpack_text(metadata["tokenizer_xz_base64"])
    source = _unpack_text(metadata["source_tokenizer_xz_base64"]) if "source_tokenizer_xz_base64" in metadata else None
    tokenizer, source_tokenizer = _tokenizers(target, source)
    return LoadedModel(model, tokenizer, json.loads(metadata["training"]), source_tokenizer)


def _pack_text(text: str) -> str:
    """xz-compressed, base64: keeps a tokenizer small enough for the export to stay within a third of the checkpoint."""
    return base64.b64encode(lzma.compress(text.encode())).decode()


def _unpack_text(packed: str) -> str:
    return lzma.decompress(base64.b64decode(packed)).decode()


def export(source: str | Path, output: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the weights, architecture, tokenizer and training progress of ``source`` as one safetensors file.

    Written under a temporary name and renamed into place; an existing ``output`` is kept unless ``force``.
    """
    output = Path(output)
    check_output(output, force)
    loaded = load(source)
    tensors = {
        name: tensor.to(DTYPES[dtype]).contiguous()
        for name, tensor in loaded.model.state_dict().items()
        if not (loaded.model.config.tie_embeddings and name == TIED_WEIGHT)
    }
    metadata = {
        "format": EXPORT_FORMAT,
        "network": type(loaded.model).__name__,
        "arch": json.dumps(asdict(loaded.model.config)),
        "tokenizer_xz_base64": _pack_text(loaded.tokenizer.to_str()),
        "training": json.dumps(loaded.training),
    }
    if loaded.source_tokenizer not in (None, loaded.tokenizer):
        metadata["source_tokenizer_xz_base64"] = _pack_text(loaded.source_tokenizer.to_str())
    with atomic_path(output) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return output


def check_output(output: Path, force: bool) -> None:
    """A UserError unless ``output`` can be written: its directory exists, and it does not or ``force`` is given."""
    if not output.parent.is_dir():
        raise UserError(f"the output directory {output.parent} does not exist: create it or choose another -o")
    if output.exists() and not force:
        raise UserError(f"{output} already exists: pass --force to replace it")
