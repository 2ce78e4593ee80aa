"""Translation data: pair sources, tokenizers per side, overlong pairs, batches and their padding masks."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from xlab.data.pairs import HubPairs, NumberPhrases, ParallelFiles
from xlab.data.splits import SplitFractions
from xlab.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer
from xlab.data.translation import TranslationDataModule, collate_pairs
from xlab.errors import UserError
from xlab.generation import encode_source

PAIRS = [
    ("one", "uno"),
    ("two hundred", "duecento"),
    ("three thousand and three", "tremilatre"),
    ("four", "quattro"),
    ("twelve euro, five cents", "dodici euro e cinque centesimi"),
] * 8


def write_tsv(path: Path, pairs=PAIRS) -> Path:
    path.write_text("".join(f"{source}\t{target}\n" for source, target in pairs), encoding="utf-8")
    return path


def datamodule(tmp_path: Path, paths: list[str], **options) -> TranslationDataModule:
    settings = {"vocab_size": 300, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), "context_length": 16}
    return TranslationDataModule(source=ParallelFiles(paths), **{**settings, **options})


def test_number_phrases_are_exact_unique_and_reproducible():
    pairs = NumberPhrases(size=300, seed=3).load()
    again = NumberPhrases(size=300, seed=3).load()
    assert pairs["source"] == again["source"] and pairs["target"] == again["target"]
    assert len(set(pairs["source"])) == 300
    assert NumberPhrases(size=300, seed=4).load()["source"] != pairs["source"]
    years = NumberPhrases(size=1100, kinds=("year",)).load()  # every year from 1000 to 2099
    translations = dict(zip(years["source"], years["target"]))
    assert len(translations) == 1100
    assert translations["nineteen ninety-nine"] == "millenovecentonovantanove"
    assert translations["twenty twelve"] == "duemiladodici"
    german = NumberPhrases(size=5, kinds=("currency",), target_lang="de").load()
    assert all("Euro" in target for target in german["target"])


def test_number_phrases_reject_unknown_languages():
    with pytest.raises(UserError, match="no language 'xx'"):
        NumberPhrases(target_lang="xx")


def test_tsv_and_jsonl_files_give_the_same_pairs(tmp_path: Path):
    tsv = write_tsv(tmp_path / "pairs.tsv", PAIRS[:5])
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"en": s, "it": t}) + "\n" for s, t in PAIRS[:5]), encoding="utf-8")
    from_tsv = ParallelFiles([str(tsv)]).load()
    from_jsonl = ParallelFiles([str(jsonl)], source_field="en", target_field="it").load()
    assert from_tsv["source"] == from_jsonl["source"] == [s for s, _ in PAIRS[:5]]
    assert from_tsv["target"] == from_jsonl["target"] == [t for _, t in PAIRS[:5]]


def test_malformed_files_are_one_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("one\tuno\nno tab here\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.tsv:2: expected source<TAB>target"):
        ParallelFiles([str(bad)]).load()
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"en": "one", "it": "uno"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="column 'source' not found"):
        ParallelFiles([str(jsonl)]).load()


def test_sequences_carry_start_and_end_tokens_on_the_right_side(tmp_path: Path):
    data = datamodule(tmp_path, [str(write_tsv(tmp_path / "p.tsv"))])
    data.prepare_data()
    data.setup("fit")
    item = data.datasets["train"][0]
    assert item["source_ids"][-1] == EOS_ID and BOS_ID not in item["source_ids"]
    assert item["target_ids"][0] == BOS_ID and item["target_ids"][-1] == EOS_ID
    assert data.source_tokenizer.decode(item["source_ids"], skip_special_tokens=True) == item["source_text"]
    assert data.tokenizer.decode(item["target_ids"], skip_special_tokens=True) == item["reference"]
    assert item["source_ids"] == encode_source(data.source_tokenizer, item["source_text"], 0, 16)


def test_batches_pad_each_side_to_its_own_length_with_masks_of_its_own_side():
    items = [
        {"source_ids": [5, 6, 7, EOS_ID], "target_ids": [BOS_ID, 8, EOS_ID], "source_text": "a", "reference": "x"},
        {"source_ids": [9, EOS_ID], "target_ids": [BOS_ID, 10, 11, 12, EOS_ID], "source_text": "b", "reference": "yz"},
    ]
    batch = collate_pairs(items)
    assert batch["source"].tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, PAD_ID, PAD_ID]]
    assert batch["source_padding"].tolist() == [[False] * 4, [False, False, True, True]]
    assert batch["target_input"].tolist() == [[BOS_ID, 8, PAD_ID, PAD_ID], [BOS_ID, 10, 11, 12]]
    assert batch["target"].tolist() == [[8, EOS_ID, PAD_ID, PAD_ID], [10, 11, 12, EOS_ID]]
    assert batch["target_padding"].tolist() == [[False, False, True, True], [False] * 4]
    assert torch.equal(batch["source_padding"], batch["source"] == PAD_ID)
    assert torch.equal(batch["target_padding"], batch["target"] == PAD_ID)
    assert batch["target_bytes"].tolist() == [1, 2]


@pytest.mark.parametrize("shared", [True, False])
def test_shared_or_separate_tokenizers_reach_the_checkpoint_state(tmp_path: Path, shared: bool):
    data = datamodule(tmp_path, [str(write_tsv(tmp_path / "p.tsv"))], shared_tokenizer=shared)
    data.prepare_data()
    data.setup("fit")
    state = data.state_dict()
    assert set(state) == {"tokenizer", "source_tokenizer"}
    assert (state["tokenizer"] == state["source_tokenizer"]) is shared
    if not shared:
        assert "Ġhundred" not in data.tokenizer.get_vocab() and "Ġhundred" in data.source_tokenizer.get_vocab()


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_pairs_are_dropped_or_truncated_and_counted(tmp_path: Path, overlong: str):
    everything = SplitFractions(train=1.0, val=0.0, test=0.0, predict=0.0)
    data = datamodule(
        tmp_path, [str(write_tsv(tmp_path / "p.tsv"))], context_length=6, overlong=overlong, splits=everything
    )
    data.prepare_data()
    tokenizer = load_tokenizer(data.tokenizer_paths()["target"])
    too_long = sum(
        max(len(tokenizer.encode(source).ids), len(tokenizer.encode(target).ids)) + 1 > 6 for source, target in PAIRS
    )
    assert 0 < too_long < len(PAIRS)
    stats = data.stats()["train"]
    dropping = overlong == "drop"
    assert stats == stats | {"pairs": len(PAIRS) - too_long * dropping, "dropped": too_long * dropping}
    assert stats["truncated"] == too_long * (not dropping)
    train = datasets.load_from_disk(str(data.tokens_dir() / "train"))
    assert len(train) == stats["pairs"]
    for item in train:
        assert len(item["source_ids"]) <= 6 and len(item["target_ids"]) - 1 <= 6
        assert item["source_ids"][-1] == EOS_ID and item["target_ids"][-1] == EOS_ID


def test_split_is_deterministic_and_disjoint(tmp_path: Path):
    pairs = [(f"number {i}", f"numero {i}") for i in range(100)]
    data = datamodule(tmp_path, [str(write_tsv(tmp_path / "p.tsv", pairs))])
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    splits = {name: set(dataset["source_text"]) for name, dataset in data.datasets.items()}
    assert not splits["train"] & splits["val"] and not splits["train"] & splits["test"]
    assert len(splits["train"]) == 90
    other = datamodule(tmp_path / "again", [str(tmp_path / "p.tsv")])
    other.prepare_data()
    other.setup("test")
    assert set(other.datasets["test"]["source_text"]) == splits["test"]


def test_empty_sources_and_splits_are_one_clear_error(tmp_path: Path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no sentence pairs"):
        datamodule(tmp_path, [str(empty)]).prepare_data()
    data = datamodule(tmp_path, [str(write_tsv(tmp_path / "p.tsv"))], context_length=3)
    data.prepare_data()
    with pytest.raises(UserError, match=r"the (train|val) split has no sentence pairs within 3 tokens: raise"):
        data.setup("fit")


def test_hub_pairs_unpack_opus_style_translation_records(monkeypatch: pytest.MonkeyPatch):
    records = [{"en": "one", "it": "uno"}, {"en": "two", "it": "due"}]
    calls = []

    def fake_load_dataset(path, name, split, revision):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_dict({"id": ["0", "1"], "translation": records})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs = HubPairs("Helsinki-NLP/opus_books", "en-it", source_lang="it", target_lang="en").load()
    assert calls == [("Helsinki-NLP/opus_books", "en-it", "train", None)]
    assert pairs.column_names == ["source", "target"]
    assert pairs["source"] == ["uno", "due"] and pairs["target"] == ["one", "two"]
    key = HubPairs("Helsinki-NLP/opus_books", "en-it").cache_key()
    assert key != HubPairs("Helsinki-NLP/opus_books", "en-fr").cache_key() and "/" not in key
