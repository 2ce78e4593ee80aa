"""Every model family through the registry: trained by the CLI, loaded, exported and loaded again, generating
alike; and the shapes the data gives the model."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tests.conftest import ROOT, run_cli, tiny_args, write_corpus
from tests.test_translate_cli import translator_args
from tests.test_translation_data import PAIRS, write_tsv
from xlab.checkpoint import LoadedModel, export, load
from xlab.data.pairs import SOURCE, TARGET
from xlab.errors import UserError
from xlab.generation import GenerationConfig
from xlab.infer_cli import Runner
from xlab.models.families import FAMILIES, resolve

CYCLE_ARGS = [
    "-c",
    str(ROOT / "conf" / "cycle.yaml"),
    "--data.init_args.source.init_args.size=600",
    "--data.init_args.paired_size=20",
    "--data.init_args.val_size=8",
    "--data.init_args.test_size=8",
    "--data.init_args.vocab_size=300",
    "--data.init_args.batch_size=8",
    "--model.init_args.arch.d_model=32",
    "--model.init_args.max_new_tokens=8",
    "--model.init_args.mixing.cycle_start=2",
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
# Per family: command-line arguments for a tiny run in a directory, and inputs to continue or translate.
RUNS = {
    "lm": (lambda directory: tiny_args(write_corpus(directory / "corpus")), ["The model", "attention mixes"]),
    "translator": (
        lambda directory: translator_args(
            write_tsv(directory / "pairs.tsv"), "--trainer.max_steps=30", "--trainer.val_check_interval=15"
        ),
        ["two hundred", "four"],
    ),
    "cycle": (lambda directory: CYCLE_ARGS, ["trecento", "dodici"]),
}
DIRECTION = {"cycle": "it-en"}  # families of several directions: the one to run
IMPLEMENTATION = {"lm": "xlab", "translator": "xlab", "cycle": "adapters"}  # what each run's configuration builds


def test_every_registered_family_has_a_round_trip_case():
    assert set(RUNS) == set(FAMILIES)


def logits(loaded: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """The network's logits for token ids ``inputs``, as source and target alike for an encoder-decoder."""
    with torch.no_grad():
        if FAMILIES["cycle"] is loaded.family:
            return torch.stack([loaded.model.direction(d)(inputs, inputs) for d in loaded.model.directions])
        if FAMILIES["translator"] is loaded.family:
            return loaded.model(inputs, inputs)
        return loaded.model(inputs)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_family_trains_loads_exports_and_generates_alike(name: str, in_tmp: Path):
    arguments, prompts = RUNS[name]
    assert run_cli("fit", *arguments(in_tmp)) == 0
    (checkpoint,) = in_tmp.glob("runs/*/checkpoints/last.ckpt")
    from_checkpoint = load(checkpoint)
    from_export = load(export(checkpoint, in_tmp / "model.safetensors"))
    for loaded in (from_checkpoint, from_export):
        assert loaded.family is FAMILIES[name]
        assert type(loaded.model) is FAMILIES[name].networks[IMPLEMENTATION[name]]
        loaded.model.eval()
    inputs = torch.randint(3, loaded.tokenizer.get_vocab_size(), (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(from_checkpoint, inputs), logits(from_export, inputs))
    config = GenerationConfig(max_new_tokens=8)
    generated = Runner(from_checkpoint, DIRECTION.get(name))(prompts, config)
    assert Runner(from_export, DIRECTION.get(name))(prompts, config) == generated
    assert all(generations[0].token_ids for generations in generated)


def test_files_from_before_the_registry_resolve_to_their_family():
    assert resolve({}, "old.ckpt") == (FAMILIES["lm"], "xlab")
    assert resolve({"network": "TorchEncoderDecoder"}, "old.ckpt") == (FAMILIES["translator"], "torch")
    assert resolve({"family": "translator", "implementation": "torch"}, "new.ckpt") == (FAMILIES["translator"], "torch")
    with pytest.raises(UserError, match="'speech' family, which this XLab lacks"):
        resolve({"family": "speech"}, "future.ckpt")


def test_the_model_gets_the_trained_vocabularies_of_two_tokenizers(in_tmp: Path):
    from xlab.cli import XLabCLI

    pairs = write_tsv(in_tmp / "pairs.tsv", PAIRS)
    separate = ["--data.init_args.shared_tokenizer=false", "--data.init_args.vocab_size=1000"]
    cli = XLabCLI(translator_args(pairs, *separate), run=False)
    source, target = cli.datamodule.model_shapes()["source_vocab_size"], cli.datamodule.model_shapes()["vocab_size"]
    paths = cli.datamodule.tokenizer_paths()
    trained = {side: Tokenizer.from_file(str(path)).get_vocab_size() for side, path in paths.items()}
    assert (source, target) == (trained[SOURCE], trained[TARGET])
    assert source != target and max(source, target) < 1000  # both sides ran out of merges, at different sizes
    network = cli.model.model
    assert network.source_embed.num_embeddings == source and network.embed.num_embeddings == target
    assert network.head.out_features == target
