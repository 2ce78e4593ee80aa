"""Exports: round trip, size, safe loading, inspection and bad input."""

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import run_cli, run_script, tiny_args, write_corpus
from xlab.checkpoint import export, load, load_model
from xlab.errors import UserError
from xlab.generation import GenerationConfig, generate
from xlab.manage_cli import main as manage


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model wide enough that its tokenizer is a small part of the files."""
    directory = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(directory / "corpus")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        assert run_cli("fit", *tiny_args(corpus, "--model.init_args.arch.d_model=128")) == 0
    finally:
        os.chdir(cwd)
    return directory / "runs" / "defaults" / "checkpoints" / "last.ckpt"


def test_export_gives_bit_identical_logits_and_generation(trained: Path, tmp_path: Path):
    exported = export(trained, tmp_path / "model.safetensors")
    original, tokenizer = load_model(trained)
    restored, restored_tokenizer = load_model(exported)
    tokens = torch.randint(0, original.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(tokens), restored(tokens))
    config = GenerationConfig(max_new_tokens=12)
    prompts = ["The model", "attention mixes"]
    assert generate(original, tokenizer, prompts, config) == generate(restored, restored_tokenizer, prompts, config)
    assert restored_tokenizer.to_str() == tokenizer.to_str()


def test_export_is_a_third_of_the_checkpoint_and_bf16_half_that(trained: Path, tmp_path: Path):
    size = trained.stat().st_size
    assert export(trained, tmp_path / "fp32.safetensors").stat().st_size <= size / 3
    half = export(trained, tmp_path / "bf16.safetensors", dtype="bf16")
    # The weights halve; the compressed tokenizer (a few kB) is the same in both files.
    with safe_open(str(half), framework="pt") as file:
        tokenizer_bytes = len(file.metadata()["tokenizer_xz_base64"])
    assert half.stat().st_size <= size / 6 + tokenizer_bytes
    model, _ = load_model(half)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_export_keeps_training_progress(trained: Path, tmp_path: Path):
    loaded = load(export(trained, tmp_path / "model.safetensors"))
    assert loaded.training["global_step"] == 10
    assert loaded.training["tokens_seen"] == 10 * 8 * 32
    assert "best val/loss" in loaded.training


class Exploit:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path: Path, name: str):
    marker = tmp_path / "pwned"
    planted = tmp_path / name
    torch.save({"state_dict": {}, "payload": Exploit(marker)}, planted)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load(planted)
    raw = tmp_path / f"raw-{name}"
    raw.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(UserError):
        load(raw)
    assert not marker.exists()


def test_foreign_and_truncated_safetensors_are_refused(trained: Path, tmp_path: Path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not an XLab export"):
        load(foreign)
    exported = export(trained, tmp_path / "model.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(truncated)


def test_validate_and_infer_accept_an_export(trained: Path, tmp_path: Path):
    exported = export(trained, tmp_path / "model.safetensors")
    corpus = trained.parents[3] / "corpus"

    def val_loss(path: Path) -> str:
        result = run_script("xlab.py", "validate", *tiny_args(corpus), f"--ckpt_path={path}", cwd=trained.parents[3])
        assert result.returncode == 0, result.stderr
        return re.search(r"val/loss\s+│?\s*([0-9.]+)", result.stdout).group(1)

    assert val_loss(exported) == val_loss(trained)
    from_export = run_script("infer.py", str(exported), "The model", "--max-new-tokens", "8", cwd=tmp_path)
    from_checkpoint = run_script("infer.py", str(trained), "The model", "--max-new-tokens", "8", cwd=tmp_path)
    assert from_export.returncode == 0 and from_export.stdout == from_checkpoint.stdout


def test_manage_export_and_inspect(trained: Path, tmp_path: Path):
    output = tmp_path / "model.safetensors"
    result = run_script("manage.py", "export-checkpoint", str(trained), "-o", str(output), cwd=tmp_path)
    assert result.returncode == 0 and output.exists(), result.stderr
    again = run_script("manage.py", "export-checkpoint", str(trained), "-o", str(output), cwd=tmp_path)
    assert again.returncode == 2 and "already exists: pass --force" in again.stderr
    forced = run_script("manage.py", "export-checkpoint", str(trained), "-o", str(output), "--force", cwd=tmp_path)
    assert forced.returncode == 0
    report = run_script("manage.py", "inspect", str(output), cwd=tmp_path).stdout
    model, tokenizer = load_model(output)
    assert f"{sum(p.numel() for p in model.parameters()):,}" in report
    assert f"tokenizer   {tokenizer.get_vocab_size():,} tokens (3 special)" in report
    assert "global step 10" in report and "export" in report
    assert re.search(r"blocks\.1\s+[\d,]+", report)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["export-checkpoint", "missing.ckpt"], "missing.ckpt does not exist"),
        (["export-checkpoint", "{ckpt}", "-o", "no/such/dir/out.safetensors"], "output directory no/such/dir"),
        (["export-checkpoint", "{junk}"], "is not a readable checkpoint"),
        (["export-checkpoint", "{truncated}"], "is not a readable checkpoint"),
        (["inspect", "{junk}"], "is not a readable checkpoint"),
    ],
)
def test_manage_bad_input_is_one_clear_line(
    trained: Path, tmp_path: Path, monkeypatch, capsys, arguments: list[str], message: str
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    (tmp_path / "truncated.ckpt").write_bytes(trained.read_bytes()[:1000])
    paths = {"ckpt": trained, "junk": tmp_path / "junk.ckpt", "truncated": tmp_path / "truncated.ckpt"}
    assert manage([a.format(**paths) for a in arguments]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))
