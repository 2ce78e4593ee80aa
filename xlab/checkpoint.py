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
from xlab.models import genomic  # noqa: F401  (registers its transforms, so files that record them load)
from xlab.models.config import TransformerConfig
from xlab.models.families import Family, family_of, resolve
from xlab.models.network import Network
from xlab.models.transforms import from_records, materialize, record

EXPORT_FORMAT = "xlab-export/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIED_WEIGHT = "head.weight"


@dataclass
class LoadedModel:
    """A model with its tokenizer and what is known of its training (step, tokens, metrics).

    ``tokenizer`` is the one the model writes with; a translator also has the ``source_tokenizer``
    its encoder reads with (the same object when the two sides share one). Which ones a model
    carries is its family's (``xlab.models.families``) ``tokenizers``.
    """

    model: Network
    tokenizer: Tokenizer
    training: dict[str, Any] = field(default_factory=dict)
    source_tokenizer: Tokenizer | None = None

    def __post_init__(self) -> None:
        if "source_tokenizer" in self.family.tokenizers and self.source_tokenizer is None:
            self.source_tokenizer = self.tokenizer

    @property
    def family(self) -> Family:
        return family_of(self.model)

    def tokenizers(self) -> dict[str, Tokenizer]:
        """The family's tokenizers by their checkpoint key."""
        return {key: getattr(self, key) for key in self.family.tokenizers}


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
    model = _build(path, hparams, hparams["arch"], weights)
    return _loaded(model, {key: data.get(key) for key in family_of(model).tokenizers}, _training_progress(checkpoint))


def _loaded(model: Network, tokenizers: dict[str, str | None], training: dict[str, Any]) -> LoadedModel:
    """The model with its family's tokenizers, read from JSON; a missing one, or one equal to the first, is
    the first (the same object, as a shared tokenizer is)."""
    first, *others = tokenizers
    primary = Tokenizer.from_str(tokenizers[first])
    loaded = {first: primary}
    for key in others:
        text = tokenizers[key]
        loaded[key] = primary if text is None or text == tokenizers[first] else Tokenizer.from_str(text)
    return LoadedModel(model, training=training, **loaded)


def _training_progress(checkpoint: dict[str, Any]) -> dict[str, Any]:
    progress = {key: checkpoint[key] for key in ("global_step", "epoch", "tokens_seen") if key in checkpoint}
    for state in checkpoint.get("callbacks", {}).values():
        if state.get("best_model_score") is not None:
            progress[f"best {state['monitor']}"] = float(state["best_model_score"])
    return progress


def _build(path: Path, record: dict[str, Any], arch: dict[str, Any], weights: dict[str, torch.Tensor]) -> Network:
    """The network ``record`` (hyperparameters or export metadata) names, transforms applied, with ``weights``."""
    family, implementation = resolve(record, str(path))
    config = TransformerConfig(**arch)
    transforms = from_records(record.get("transforms", []), str(path))
    model = family.build(config, implementation, transforms, record.get("network_options"))
    weights = {name: tensor for name, tensor in weights.items() if not is_tied(config, name)}
    model.to(next(iter(weights.values())).dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not is_tied(config, name) for name in missing):
        raise UserError(f"{path}: its weights do not match its recorded architecture")
    return model


def is_tied(config: TransformerConfig, name: str) -> bool:
    """Whether weight ``name`` is an output head tied to its embedding: kept once, as the embedding (a network
    holding several translators, as a cycle translator's, has a head per translator)."""
    return config.tie_embeddings and (name == TIED_WEIGHT or name.endswith("." + TIED_WEIGHT))


def recorded_network(path: str | Path) -> dict[str, Any] | None:
    """The recorded ``arch`` (TransformerConfig fields) and ``transforms`` (``transforms.record``) of a checkpoint
    or export, None if it records no architecture."""
    path = _existing(path)
    if is_export(path):
        metadata = _export_metadata(path)
        return {"arch": json.loads(metadata["arch"]), "transforms": json.loads(metadata.get("transforms", "[]"))}
    hparams = read_checkpoint(path).get("hyper_parameters", {})
    return {"arch": hparams["arch"], "transforms": hparams.get("transforms", [])} if "arch" in hparams else None


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
    record = {
        **metadata,
        "transforms": json.loads(metadata.get("transforms", "[]")),
        "network_options": json.loads(metadata.get("network_options", "{}")),
    }
    model = _build(path, record, json.loads(metadata["arch"]), weights)
    tokenizers = {
        key: _unpack_text(metadata[f"{key}_xz_base64"]) if f"{key}_xz_base64" in metadata else None
        for key in family_of(model).tokenizers
    }
    return _loaded(model, tokenizers, json.loads(metadata["training"]))


def _pack_text(text: str) -> str:
    """xz-compressed, base64: keeps a tokenizer small enough for the export to stay within a third of the checkpoint."""
    return base64.b64encode(lzma.compress(text.encode())).decode()


def _unpack_text(packed: str) -> str:
    return lzma.decompress(base64.b64decode(packed)).decode()


def export(
    source: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    plain: bool = False,
    compact: bool = False,
) -> Path:
    """Write the weights, architecture, transforms, tokenizers and training progress of ``source`` as one
    safetensors file; ``plain`` materialises the transforms first, for a transform-free network, as is done
    unless ``compact`` when a transform asks for it (``Transform.export_plain``: a genome's predicted weights).

    Written under a temporary name and renamed into place; an existing ``output`` is kept unless ``force``.
    """
    output = Path(output)
    check_output(output, force)
    loaded = load(source)
    folds = plain or (not compact and any(transform.export_plain for transform in loaded.model.transforms))
    model = materialize(loaded.model) if folds else loaded.model
    family = loaded.family
    tensors = {
        name: tensor.to(DTYPES[dtype]).contiguous()
        for name, tensor in model.state_dict().items()
        if not is_tied(model.config, name)
    }
    metadata = {
        "format": EXPORT_FORMAT,
        "family": family.name,
        "implementation": family.implementation(model),
        "arch": json.dumps(asdict(model.config)),
        "transforms": json.dumps(record(model.transforms)),
        "network_options": json.dumps(model.options()),
        "training": json.dumps(loaded.training),
    }
    tokenizers = loaded.tokenizers()
    for key, tokenizer in tokenizers.items():
        if key == family.tokenizers[0] or tokenizer is not tokenizers[family.tokenizers[0]]:
            metadata[f"{key}_xz_base64"] = _pack_text(tokenizer.to_str())
    with atomic_path(output) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return output


def check_output(output: Path, force: bool) -> None:
    """A UserError unless ``output`` can be written: its directory exists, and it does not or ``force`` is given."""
    if not output.parent.is_dir():
        raise UserError(f"the output directory {output.parent} does not exist: create it or choose another -o")
    if output.exists() and not force:
        raise UserError(f"{output} already exists: pass --force to replace it")
