"""Data pipeline: sources, splits, tokenizer, encoding cache, packing and resumable loading."""

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tests.conftest import write_corpus
from xlab.data.encoding import encode_documents, write_packed
from xlab.data.lm import LMDataModule
from xlab.data.loading import PackedSequences, ResumableLoader, ResumableSampler, ShardSampler
from xlab.data.sources import HubDataset, LocalFiles, PythonDocs
from xlab.data.splits import SplitFractions, split_indices
from xlab.data.tokenizer import EOS_ID, SPECIAL_TOKENS, token_byte_lengths, train_tokenizer
from xlab.errors import UserError

AWKWARD_TEXT = (
    "Hello,  world!\n\n\tTabbed\tline\r\nWindows line end   trailing spaces   \n"
    "naïve café — ünïcödé, e\u0301 (combining), zero\u200bwidth, Ελληνικά, русский, 日本語のテキスト, "
    "한국어, العربية, עברית, हिन्दी, emoji 🙂👍🏽🇮🇹, math ∑∫√, nbsp\u00a0here, lone surrogate-free \U0001f600\n\n\n"
)


def test_splits_are_deterministic_disjoint_and_complete():
    fractions = SplitFractions()
    first = split_indices(1000, fractions, seed=7)
    again = split_indices(1000, fractions, seed=7)
    other = split_indices(1000, fractions, seed=8)
    assert all(np.array_equal(first[name], again[name]) for name in first)
    assert not np.array_equal(first["train"], other["train"])
    union = np.concatenate(list(first.values()))
    assert len(union) == len(set(union.tolist())) == 1000
    assert [len(first[name]) for name in ("train", "val", "test", "predict")] == [900, 50, 25, 25]


def test_split_fractions_reject_impossible_values():
    with pytest.raises(UserError, match="data.splits"):
        SplitFractions(train=0.9, val=0.2)
    with pytest.raises(UserError, match="data.splits"):
        SplitFractions(val=-0.1)


def test_tokenizer_round_trips_any_unicode_exactly():
    tokenizer = train_tokenizer([AWKWARD_TEXT * 3, "plain english text " * 50], vocab_size=400)
    for text in (AWKWARD_TEXT, "  leading and trailing  ", "\n", "x", "中" * 9, "\x00\x01 control"):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.get_vocab_size() <= 400


def test_extra_special_tokens_follow_pad_bos_eos_and_are_never_split():
    texts = ["<|user|> hello <|sep|> world " * 20]
    tokenizer = train_tokenizer(texts, vocab_size=300, extra_special_tokens=["<|user|>", "<|sep|>"])
    assert [tokenizer.token_to_id(t) for t in (*SPECIAL_TOKENS, "<|user|>", "<|sep|>")] == [0, 1, 2, 3, 4]
    assert tokenizer.encode("a<|sep|>b").ids[1] == 4
    assert token_byte_lengths(tokenizer, 300)[[3, 4]].tolist() == [0, 0]
    with pytest.raises(UserError, match="at least 261"):
        train_tokenizer(["x"], vocab_size=260, extra_special_tokens=["<|a|>", "<|b|>"])
    with pytest.raises(UserError, match="distinct"):
        train_tokenizer(["x"], vocab_size=300, extra_special_tokens=["<|eos|>"])


def test_token_byte_lengths_add_up_to_the_utf8_size():
    tokenizer = train_tokenizer([AWKWARD_TEXT], vocab_size=350)
    lengths = token_byte_lengths(tokenizer, 350)
    ids = tokenizer.encode(AWKWARD_TEXT).ids
    assert lengths[ids].sum() == len(AWKWARD_TEXT.encode())
    assert lengths[EOS_ID] == 0


def test_vocabulary_too_small_for_bytes_and_specials_is_refused():
    with pytest.raises(UserError, match="at least 259"):
        train_tokenizer(["text"], vocab_size=258)


def test_python_docs_are_offline_deterministic_and_never_imported():
    source = PythonDocs()
    documents = source.load()
    size = sum(len(text) for text in documents["text"])
    assert 1_500_000 < size < 2_500_000
    assert documents["text"][:50] == PythonDocs().load()["text"][:50]
    assert any(text.startswith('The "assert" statement') for text in documents["text"])
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert source.cache_key().startswith(f"pydocs-{sys.implementation.name}")


def test_local_text_files_by_glob_and_paragraph(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.txt").write_text("third\n")
    by_document = LocalFiles([str(tmp_path / "*.txt")]).load()
    by_paragraph = LocalFiles([str(tmp_path / "*.txt")], sample_by="paragraph").load()
    assert len(by_document) == 2 and "second paragraph" in by_document["text"][0]
    assert len(by_paragraph) == 3


def test_local_jsonl_column_and_mistakes(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}", "id": i}) for i in range(5)))
    assert LocalFiles([str(path)], column="body").load()["text"] == [f"document {i}" for i in range(5)]
    with pytest.raises(UserError, match="column 'text' not found"):
        LocalFiles([str(path)]).load()
    with pytest.raises(UserError, match="no file matches"):
        LocalFiles([str(tmp_path / "missing*.txt")]).load()
    (tmp_path / "note.txt").write_text("x")
    with pytest.raises(UserError, match="mixes file kinds"):
        LocalFiles([str(tmp_path / "*")]).load()


def test_local_files_cache_key_changes_with_content(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = LocalFiles([str(path)]).cache_key()
    path.write_text("one two")
    assert LocalFiles([str(path)]).cache_key() != before


def write_wikipedia_like(directory: Path, documents: int = 40) -> Path:
    """A local dataset shaped like wikimedia/wikipedia: config ``20231101.en``, columns id, url, title, text."""
    rows = {
        "id": [str(i) for i in range(documents)],
        "url": [f"https://example.org/wiki/{i}" for i in range(documents)],
        "title": [f"Article {i}" for i in range(documents)],
        "text": [f"Article {i} is about the number {i}. " * 20 for i in range(documents)],
    }
    (directory / "20231101.en").mkdir(parents=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(directory / "20231101.en" / "train-00000-of-00001.parquet"))
    (directory / "README.md").write_text(
        "---\nconfigs:\n- config_name: 20231101.en\n  data_files:\n  - split: train\n"
        "    path: 20231101.en/train-*\n---\n"
    )
    return directory


def test_hub_dataset_loading_path_on_a_local_dataset(tmp_path: Path):
    directory = write_wikipedia_like(tmp_path / "wiki")
    documents = HubDataset(str(directory), name="20231101.en", split="train", column="text").load()
    assert documents.column_names == ["text"] and len(documents) == 40
    with pytest.raises(UserError, match="has: id, url, title, text"):
        HubDataset(str(directory), name="20231101.en", column="body").load()


def test_parallel_encoding_matches_serial(tmp_path: Path):
    documents = LocalFiles([str(write_corpus(tmp_path / "c", documents=30) / "*.txt")]).load()
    tokenizer = train_tokenizer(documents["text"], vocab_size=300)
    serial = write_packed(encode_documents(documents, tokenizer, None), tmp_path / "serial.npy", 300)
    parallel = write_packed(encode_documents(documents, tokenizer, 2), tmp_path / "parallel.npy", 300)
    assert serial == parallel
    tokens = np.load(tmp_path / "serial.npy")
    assert np.array_equal(tokens, np.load(tmp_path / "parallel.npy"))
    assert tokens.dtype == np.uint16 and (tokens == EOS_ID).sum() == len(documents)
    first = tokenizer.decode(tokens[: np.argmax(tokens == EOS_ID)].tolist())
    assert first == documents["text"][0]
    assert serial["bytes"] == sum(len(text.encode()) for text in documents["text"])


def make_datamodule(corpus: Path, cache: Path, **options) -> LMDataModule:
    settings = {"context_length": 16, "vocab_size": 300, "batch_size": 4, "cache_dir": str(cache), **options}
    return LMDataModule(source=LocalFiles([str(corpus / "*.txt")]), **settings)


def test_datamodule_packs_shifted_windows_and_counts_bytes(corpus: Path, tmp_path: Path):
    data = make_datamodule(corpus, tmp_path / "cache")
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input"].shape == batch["target"].shape == (4, 16)
    assert torch.equal(batch["input"][:, 1:], batch["target"][:, :-1])
    lengths = token_byte_lengths(data.tokenizer, 300)
    assert torch.equal(batch["target_bytes"], torch.from_numpy(lengths[batch["target"].numpy()].sum(1)))
    stats = data.stats()
    assert sum(split["documents"] for split in stats.values()) == 120


def test_second_prepare_reuses_the_cache_without_loading(corpus: Path, tmp_path: Path, monkeypatch):
    make_datamodule(corpus, tmp_path / "cache").prepare_data()
    data = make_datamodule(corpus, tmp_path / "cache")
    monkeypatch.setattr(LocalFiles, "load", lambda self: pytest.fail("the cache was not reused"))
    data.prepare_data()
    data.setup("validate")
    assert len(data.datasets["val"]) > 0


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"zqxj{chr(97 + index // 5)}{chr(97 + index % 5)}marker" for index in range(20)]
    for index, word in enumerate(words):
        (corpus / f"{index:02d}.txt").write_text(f"{word} " * 30)
    data = LMDataModule(
        source=LocalFiles([str(corpus / "*.txt")]), vocab_size=400, cache_dir=str(tmp_path / "cache"), seed=3
    )
    data.prepare_data()
    vocab = list(Tokenizer.from_file(str(data.tokenizer_path)).get_vocab())
    indices = split_indices(20, data.splits, 3)
    held_out = [words[i] for name in ("val", "test", "predict") for i in indices[name]]
    trained = [words[i] for i in indices["train"]]
    assert held_out
    assert all(any(word in token for token in vocab) for word in trained)
    assert not any(word in token for token in vocab for word in held_out)


def test_empty_source_and_empty_split_are_clear_errors(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    empty = LMDataModule(source=LocalFiles([str(tmp_path / "empty.jsonl")]), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError):
        empty.prepare_data()
    corpus = write_corpus(tmp_path / "corpus", documents=20)
    no_val = make_datamodule(corpus, tmp_path / "cache", splits=SplitFractions(train=1.0, val=0.0, test=0, predict=0))
    no_val.prepare_data()
    with pytest.raises(UserError, match="the val split has 0 tokens"):
        no_val.setup("fit")


def test_resumable_loader_continues_the_same_permutation():
    dataset = PackedSequences(np.arange(1000, dtype=np.uint16), 9, np.ones(1000, dtype=np.int64))

    def loader() -> ResumableLoader:
        return ResumableLoader(dataset, ResumableSampler(dataset, 1, 0, seed=5), batch_size=4, drop_last=True)

    reference = loader()
    reference.sampler.set_epoch(1)
    expected = [batch["input"][:, 0].tolist() for batch in reference]

    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator)["input"][:, 0].tolist() for _ in range(7)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_seen": 7}

    resumed = loader()
    resumed.load_state_dict(state)
    rest = [batch["input"][:, 0].tolist() for batch in resumed]
    assert seen + rest == expected
    assert resumed.state_dict() == {"epoch": 1, "batches_seen": len(expected)}


def test_shard_sampler_covers_each_item_once_without_padding():
    dataset = list(range(11))
    shards = [list(ShardSampler(dataset, 3, rank)) for rank in range(3)]
    assert sorted(sum(shards, [])) == dataset
    assert [len(ShardSampler(dataset, 3, rank)) for rank in range(3)] == [4, 4, 3]
