"""Hugging Face exports: transformers loads them and computes what XLab computes; unmappable options are refused."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import xlab.hf  # noqa: E402
from tests.conftest import WORDS, run_cli, tiny_args, write_corpus  # noqa: E402
from xlab.checkpoint import LoadedModel, export, load_model  # noqa: E402
from xlab.data.tokenizer import train_tokenizer  # noqa: E402
from xlab.errors import UserError  # noqa: E402
from xlab.generation import GenerationConfig, generate  # noqa: E402
from xlab.hf import export_hf, write_hf  # noqa: E402
from xlab.manage_cli import main as manage  # noqa: E402
from xlab.models.config import TransformerConfig  # noqa: E402
from xlab.models.decoder import Decoder  # noqa: E402

SENTENCE = "The model learns attention, and the optimizer follows the gradient downhill."
LLAMA = {"positions": "rotary", "norm": "rmsnorm", "activation": "swiglu", "bias": False}
MAPPED = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-relu-untied": ({"activation": "relu", "tie_embeddings": False}, "GPT2LMHeadModel"),
    "gpt2-relu2-zero-init": ({"activation": "relu2", "zero_init_projections": True}, "GPT2LMHeadModel"),
    "llama-gqa-tied": ({**LLAMA, "n_kv_heads": 2}, "LlamaForCausalLM"),
    "llama-gqa-untied": ({**LLAMA, "n_kv_heads": 1, "tie_embeddings": False, "rope_base": 500.0}, "LlamaForCausalLM"),
    "llama-bias": ({**LLAMA, "bias": True}, "LlamaForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer([" ".join(WORDS).capitalize() + "."] * 20, vocab_size=300, extra_special_tokens=["<|sep|>"])


def random_model(tokenizer: Tokenizer, **options) -> LoadedModel:
    """A small decoder whose weights (norms and biases too) are far from their initial values, so any mix-up shows."""
    config = TransformerConfig(vocab_size=320, context_length=32, n_layers=2, d_model=32, n_heads=4, **options)
    torch.manual_seed(0)
    model = Decoder(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return LoadedModel(model, tokenizer)


def from_pretrained(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def leftovers(directory: Path) -> list[Path]:
    return [path for path in directory.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("name", MAPPED)
def test_transformers_computes_the_same_logits_tokens_and_generations(tokenizer: Tokenizer, tmp_path: Path, name):
    options, architecture = MAPPED[name]
    loaded = random_model(tokenizer, **options)
    write_hf(loaded, tmp_path / "hf")
    model, hf_tokenizer = from_pretrained(tmp_path / "hf")

    assert type(model).__name__ == architecture
    tokens = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, loaded.model(tokens), atol=1e-5, rtol=1e-5)

    assert isinstance(hf_tokenizer, transformers.PreTrainedTokenizerFast)
    assert (hf_tokenizer.pad_token, hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (0, 1, 2)
    assert hf_tokenizer.model_max_length == 32
    for text in (SENTENCE, "first <|sep|> second"):
        ids = hf_tokenizer(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False) == text

    prompt = "The model"
    ours = generate(loaded.model, tokenizer, [prompt], GenerationConfig(max_new_tokens=6))[0][0].token_ids
    input_ids = torch.tensor([tokenizer.encode(prompt).ids])
    theirs = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=6, do_sample=False)
    assert theirs[0, input_ids.size(1) :].tolist() == ours


def test_bf16_export_is_stored_and_loaded_in_bf16(tokenizer: Tokenizer, tmp_path: Path):
    loaded = random_model(tokenizer, **LLAMA)
    write_hf(loaded, tmp_path / "hf", dtype="bf16")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as file:
        assert {file.get_tensor(key).dtype for key in file.keys()} == {torch.bfloat16}
    model, _ = from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"positions": "sinusoidal"}, ["positions=sinusoidal (needs learned)", "positions=sinusoidal (needs rotary)"]),
        ({"norm_placement": "post"}, ["norm_placement=post (needs pre)"]),
        ({**LLAMA, "activation": "relu"}, ["activation=relu (needs swiglu)"]),
        ({"n_kv_heads": 2}, ["n_kv_heads=2 (needs n_heads, 4)"]),
        ({**LLAMA, "norm": "layernorm", "bias": True}, ["norm=layernorm (needs rmsnorm)"]),
        ({"qk_norm": True}, ["for GPT-2, qk_norm=true (needs false)"]),
        ({**LLAMA, "qk_norm": True}, ["for Llama, qk_norm=true (needs false)"]),
        ({"logit_softcap": 30.0}, ["for GPT-2, logit_softcap=30.0 (needs null)"]),
        ({**LLAMA, "logit_softcap": 30.0}, ["for Llama, logit_softcap=30.0 (needs null)"]),
        ({**LLAMA, "activation": "relu2"}, ["for Llama, activation=relu2 (needs swiglu)"]),
    ],
)
def test_options_without_a_counterpart_are_refused_by_name(tokenizer: Tokenizer, tmp_path: Path, options, named):
    with pytest.raises(UserError, match="cannot export .* to Hugging Face format") as refusal:
        write_hf(random_model(tokenizer, **options), tmp_path / "hf")
    for text in named:
        assert text in str(refusal.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_export_whole(tokenizer: Tokenizer, tmp_path: Path, monkeypatch):
    output = tmp_path / "hf"
    write_hf(random_model(tokenizer), output)
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(xlab.hf, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_hf(random_model(tokenizer, **LLAMA), output)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(directory / "corpus", documents=40)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        assert run_cli("fit", *tiny_args(corpus, "--trainer.max_steps=2", "--trainer.val_check_interval=2")) == 0
    finally:
        os.chdir(cwd)
    return directory / "runs" / "defaults" / "checkpoints" / "last.ckpt"


def test_manage_exports_a_checkpoint_beside_it_and_replaces_only_with_force(trained: Path, capsys):
    output = trained.parent / "last-hf"
    assert manage(["export-checkpoint", str(trained), "--format", "hf"]) == 0
    assert f"wrote {output}/" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    original, tokenizer = load_model(trained)
    model, hf_tokenizer = from_pretrained(output)
    text = "the model learns to predict the next token"
    tokens = torch.tensor([tokenizer.encode(text).ids])
    assert hf_tokenizer(text, return_tensors="pt")["input_ids"].tolist() == tokens.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, original(tokens), atol=1e-5, rtol=1e-5)

    assert manage(["export-checkpoint", str(trained), "--format", "hf"]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    (output / "config.json").write_text("{}")
    (output / "stale.bin").write_bytes(b"from an older export")
    assert manage(["export-checkpoint", str(trained), "--format", "hf", "--force"]) == 0
    assert json.loads((output / "config.json").read_text())["model_type"] == "gpt2"
    assert not (output / "stale.bin").exists()
    assert leftovers(trained.parent) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-o", "no/such/dir/hf"], "output directory no/such/dir does not exist"),
        (["-o", "taken", "--force"], "taken is a directory but not a Hugging Face export"),
        (["-o", "{ckpt_dir}", "--force"], "holds the checkpoint being exported"),
        (["-o", "out", "--dtype", "bf16"], "n_kv_heads=2 (needs n_heads, 4)"),
    ],
)
def test_manage_mistakes_are_one_line_and_leave_nothing(
    trained: Path, tokenizer: Tokenizer, tmp_path: Path, monkeypatch, capsys, arguments, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    checkpoint = trained
    if "n_kv_heads" in message:  # a GELU model with grouped keys/values: neither GPT-2 nor Llama
        checkpoint = tmp_path / "gqa.safetensors"
        write_export(random_model(tokenizer, n_kv_heads=2), checkpoint)
    arguments = [argument.format(ckpt_dir=trained.parent) for argument in arguments]
    assert manage(["export-checkpoint", str(checkpoint), "--format", "hf", *arguments]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert {path.name for path in tmp_path.iterdir()} == {"taken"} | ({checkpoint.name} - {trained.name})
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    assert trained.is_file() and leftovers(trained.parent) == []


def write_export(loaded: LoadedModel, path: Path) -> None:
    """An XLab export of ``loaded``, by way of a checkpoint laid out as Lightning saves LanguageModel + LMDataModule."""
    checkpoint = path.with_suffix(".ckpt")
    torch.save(
        {
            "state_dict": {f"model.{name}": tensor for name, tensor in loaded.model.state_dict().items()},
            "hyper_parameters": {"arch": asdict(loaded.model.config)},
            "LMDataModule": {"tokenizer": loaded.tokenizer.to_str()},
        },
        checkpoint,
    )
    export(checkpoint, path)
    checkpoint.unlink()


def test_export_hf_reads_xlab_exports_too(tokenizer: Tokenizer, tmp_path: Path):
    loaded = random_model(tokenizer, **LLAMA, n_kv_heads=2)
    write_export(loaded, tmp_path / "model.safetensors")
    output = export_hf(tmp_path / "model.safetensors", xlab.hf.default_output(tmp_path / "model.safetensors"))
    assert output == tmp_path / "model-hf"
    model, _ = from_pretrained(output)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, loaded.model(tokens), atol=1e-5, rtol=1e-5)
