"""Hugging Face exports: a directory that ``transformers`` loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``.

An XLab decoder maps onto a standard architecture when its options are ones that architecture
has: learned positions, LayerNorm and GELU, ReLU or ReLU squared are GPT-2 (``GPT2LMHeadModel``);
rotary positions, RMSNorm and SwiGLU are Llama (``LlamaForCausalLM``). Neither has QK-norm or
soft-capped logits; zero-initialised projections are only a starting point and map. The weights are renamed and
split, never changed, so logits agree to float rounding. Options with no counterpart are
refused by name rather than approximated.

Nothing here imports ``transformers``: the configs are written as plain JSON, so exporting
needs only safetensors.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from xlab.checkpoint import DTYPES, LoadedModel, check_output, load
from xlab.data.tokenizer import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, SPECIAL_TOKENS
from xlab.errors import UserError
from xlab.files import atomic_directory
from xlab.models.config import TransformerConfig
from xlab.models.decoder import Decoder
from xlab.models.families import family_of
from xlab.models.transforms import materialize

Weights = dict[str, Tensor]
HF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# The options each architecture fixes, with the values it accepts; every other option maps.
GPT2_OPTIONS: dict[str, tuple[Any, ...]] = {
    "positions": ("learned",),
    "norm": ("layernorm",),
    "norm_placement": ("pre",),
    "activation": ("gelu", "relu", "relu2"),  # transformers' "relu2" is ReLU squared too
    "bias": (True,),
    "qk_norm": (False,),
    "logit_softcap": (None,),
}
LLAMA_OPTIONS: dict[str, tuple[Any, ...]] = {
    "positions": ("rotary",),
    "norm": ("rmsnorm",),
    "norm_placement": ("pre",),
    "activation": ("swiglu",),
    "qk_norm": (False,),
    "logit_softcap": (None,),
}


def default_output(checkpoint: Path) -> Path:
    """``runs/x/last.ckpt`` -> ``runs/x/last-hf``."""
    return checkpoint.with_name(checkpoint.stem + "-hf")


def export_hf(source: str | Path, output: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write ``source`` (a training checkpoint or an XLab export) as a Hugging Face model directory.

    Built under a temporary name beside ``output`` and renamed into place; an existing ``output``
    is replaced only with ``force``. A model with no transformers counterpart is refused before
    anything is written.
    """
    source, output = Path(source), Path(output)
    check_output(output, force)
    _check_replaceable(source, output)
    loaded = load(source)
    materialize(loaded.model)  # transformers knows no XLab transforms: plain weights only
    write_hf(loaded, output, dtype, name=str(source))
    return output


def write_hf(loaded: LoadedModel, output: Path, dtype: str = "fp32", name: str = "the model") -> None:
    """The model, its tokenizer and generation defaults as the files ``from_pretrained`` reads, in ``output``.

    A UserError, before anything is written, if the model maps onto no transformers architecture.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    config, weights = convert(model, name)
    config["dtype"] = config["torch_dtype"] = HF_DTYPES[DTYPES[dtype]]  # torch_dtype: transformers < 4.56
    # Copies: safetensors refuses tensors that share memory, as the halves of kv_proj and in_proj do.
    tensors = {key: tensor.detach().to(DTYPES[dtype], copy=True).contiguous() for key, tensor in weights.items()}
    extra_specials = [
        token.content
        for token in tokenizer.get_added_tokens_decoder().values()
        if token.special and token.content not in SPECIAL_TOKENS
    ]
    with atomic_directory(output) as directory:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        _write_json(directory / "config.json", config)
        _write_json(directory / "generation_config.json", _special_token_ids())
        (directory / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        _write_json(directory / "tokenizer_config.json", tokenizer_config(model.config, extra_specials))


def convert(model: Decoder, name: str = "the model") -> tuple[dict[str, Any], Weights]:
    """The config.json contents and the renamed weights of the architecture ``model`` maps onto.

    A UserError names the options that stop it mapping, for the nearest architecture first.
    """
    family = family_of(model)
    if "hf" not in family.export_formats:
        formats = ", ".join(f"--format {f}" for f in family.export_formats)
        raise UserError(f"{name} is a {family.name} ({model.label}), which has no Hugging Face format: use {formats}")
    mismatches = {architecture.label: architecture.mismatches(model.config) for architecture in ARCHITECTURES}
    for architecture in ARCHITECTURES:
        if not mismatches[architecture.label]:
            return architecture.mapping(model)
    reasons = "; ".join(
        f"for {label}, {', '.join(unmet)}" for label, unmet in sorted(mismatches.items(), key=lambda item: len(item[1]))
    )
    raise UserError(
        f"cannot export {name} to Hugging Face format: no transformers architecture has its options: {reasons}"
    )


def gpt2_mismatches(config: TransformerConfig) -> list[str]:
    """The options that keep ``config`` from being a GPT-2, as ``option=value (needs ...)``."""
    unmet = _unmet(config, GPT2_OPTIONS)
    if config.n_kv_heads != config.n_heads:
        unmet.append(f"n_kv_heads={config.n_kv_heads} (needs n_heads, {config.n_heads})")
    return unmet


def llama_mismatches(config: TransformerConfig) -> list[str]:
    """The options that keep ``config`` from being a Llama, as ``option=value (needs ...)``."""
    return _unmet(config, LLAMA_OPTIONS)


def _unmet(config: TransformerConfig, options: dict[str, tuple[Any, ...]]) -> list[str]:
    return [
        f"{option}={_show(getattr(config, option))} (needs {' or '.join(map(_show, accepted))})"
        for option, accepted in options.items()
        if getattr(config, option) not in accepted
    ]


def _show(value: Any) -> str:
    """A value as YAML writes it: true, false, null."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def gpt2(model: Decoder) -> tuple[dict[str, Any], Weights]:
    """``GPT2LMHeadModel``: Conv1D layers store their weights as (in, out), the transpose of nn.Linear's."""
    cfg = model.config
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_positions,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        # XLab's nn.GELU is the exact (erf) GELU; GPT-2's own "gelu_new" is the tanh approximation.
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.norm_eps,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "initializer_range": 0.02,
        **_common_config(cfg),
    }
    weights = {"transformer.wte.weight": model.embed.weight, "transformer.wpe.weight": model.positions.table.weight}
    for index, block in enumerate(model.blocks):
        prefix, attn, mlp = f"transformer.h.{index}.", block.self_attn, block.mlp
        # One c_attn computes queries, keys, values side by side: XLab's q_proj then kv_proj (keys, values).
        qkv_weight = torch.cat((attn.q_proj.weight, attn.kv_proj.weight))
        weights |= {
            **_norm(prefix + "ln_1", block.norms[0]),
            prefix + "attn.c_attn.weight": qkv_weight.T,
            prefix + "attn.c_attn.bias": torch.cat((attn.q_proj.bias, attn.kv_proj.bias)),
            **_linear(prefix + "attn.c_proj", attn.out_proj, transpose=True),
            **_norm(prefix + "ln_2", block.norms[1]),
            **_linear(prefix + "mlp.c_fc", mlp.in_proj, transpose=True),
            **_linear(prefix + "mlp.c_proj", mlp.out_proj, transpose=True),
        }
    weights |= _norm("transformer.ln_f", model.final_norm)
    return config, weights | _head(model)


def llama(model: Decoder) -> tuple[dict[str, Any], Weights]:
    """``LlamaForCausalLM``: the same rotate-half rotary layout and frequencies as XLab, so no permutation."""
    cfg = model.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta (5 still accepts it).
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "initializer_range": 0.02,
        **_common_config(cfg),
    }
    weights = {"model.embed_tokens.weight": model.embed.weight}
    for index, block in enumerate(model.blocks):
        prefix, attn, mlp = f"model.layers.{index}.", block.self_attn, block.mlp
        keys, values = _split(attn.kv_proj)  # kv_proj's rows: all key heads, then all value heads
        gate, up = _split(mlp.in_proj)  # SwiGLU's in_proj: gate, then up
        weights |= {
            **_norm(prefix + "input_layernorm", block.norms[0]),
            **_linear(prefix + "self_attn.q_proj", attn.q_proj),
            **_prefixed(prefix + "self_attn.k_proj", keys),
            **_prefixed(prefix + "self_attn.v_proj", values),
            **_linear(prefix + "self_attn.o_proj", attn.out_proj),
            **_norm(prefix + "post_attention_layernorm", block.norms[1]),
            **_prefixed(prefix + "mlp.gate_proj", gate),
            **_prefixed(prefix + "mlp.up_proj", up),
            **_linear(prefix + "mlp.down_proj", mlp.out_proj),
        }
    weights |= _norm("model.norm", model.final_norm)
    return config, weights | _head(model)


class Architecture(NamedTuple):
    """A transformers architecture: the options a model needs for it, and how its config and weights map."""

    label: str
    mismatches: Callable[[TransformerConfig], list[str]]
    mapping: Callable[[Decoder], tuple[dict[str, Any], Weights]]


# A model takes the first whose options it meets (none meets two: they differ in positions).
ARCHITECTURES = (Architecture("GPT-2", gpt2_mismatches, gpt2), Architecture("Llama", llama_mismatches, llama))


def _common_config(cfg: TransformerConfig) -> dict[str, Any]:
    return {"tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, **_special_token_ids()}


def _special_token_ids() -> dict[str, int]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _head(model: Decoder) -> Weights:
    """A tied head is left out: transformers ties it to the embedding from ``tie_word_embeddings``."""
    return {} if model.config.tie_embeddings else {"lm_head.weight": model.head.weight}


def _linear(prefix: str, layer: nn.Linear, transpose: bool = False) -> Weights:
    weights = {f"{prefix}.weight": layer.weight.T if transpose else layer.weight}
    return weights | ({f"{prefix}.bias": layer.bias} if layer.bias is not None else {})


def _split(layer: nn.Linear) -> tuple[Weights, Weights]:
    """The two halves of ``layer``'s outputs (rows of weight and bias), as {"weight": ..., "bias": ...} each."""
    halves = ({}, {})
    for name, parameter in (("weight", layer.weight), ("bias", layer.bias)):
        if parameter is not None:
            for half, part in zip(halves, parameter.chunk(2)):
                half[name] = part
    return halves


def _prefixed(prefix: str, weights: Weights) -> Weights:
    return {f"{prefix}.{name}": tensor for name, tensor in weights.items()}


def _norm(prefix: str, norm: nn.Module) -> Weights:
    weights = {f"{prefix}.weight": norm.weight}
    return weights | ({f"{prefix}.bias": norm.bias} if getattr(norm, "bias", None) is not None else {})


def tokenizer_config(cfg: TransformerConfig, extra_specials: list[str]) -> dict[str, Any]:
    """Settings for ``AutoTokenizer``: the generic fast tokenizer over tokenizer.json as it is.

    Naming ``PreTrainedTokenizerFast`` keeps transformers from choosing GPT-2's or Llama's own
    tokenizer class from config.json, which would rebuild the pipeline with their pre-tokenizers.
    No BOS/EOS is added, so ids are exactly those of XLab's ``tokenizer.encode``. Padding goes on
    the left, as batched generation needs and XLab's own generation does.
    """
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_positions,
        "padding_side": "left",
    }
    if extra_specials:
        config["additional_special_tokens"] = extra_specials
    return config


def _check_replaceable(source: Path, output: Path) -> None:
    """--force replaces a previous export, never the checkpoint itself or a directory holding other things."""
    if not output.exists():
        return
    resolved = output.resolve()
    if resolved == source.resolve() or resolved in source.resolve().parents:
        raise UserError(f"{output} is or holds the checkpoint being exported: choose another -o")
    if output.is_dir() and not (output / "config.json").is_file():
        raise UserError(
            f"{output} is a directory but not a Hugging Face export (it has no config.json): "
            "--force replaces only those, so choose another -o"
        )


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
