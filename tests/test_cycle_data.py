"""The cycle data: disjoint pools and paired sets, pools from local text files, endless resumable streams, errors."""

from pathlib import Path

import pytest
from num2words import num2words

from tests.conftest import ROOT
from xlab.cli import XLabCLI
from xlab.data.cycle import CycleDataModule, PoolStreams, collate_text
from xlab.data.pairs import SOURCE, TARGET, NumberPhrases, ParallelFiles
from xlab.data.sources import LocalFiles
from xlab.data.tokenizer import load_tokenizer
from xlab.errors import UserError
from xlab.models.cycle_synthetic import SyntheticSources


def numbers(cache: Path, **options) -> CycleDataModule:
    settings = {"paired_size": 40, "val_size": 30, "test_size": 30, "vocab_size": 300, "batch_size": 8}
    return CycleDataModule(NumberPhrases(size=500), cache_dir=str(cache), **{**settings, **options})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> CycleDataModule:
    data = numbers(tmp_path_factory.mktemp("cache"))
    data.prepare_data()
    data.setup("fit")
    return data


def test_pools_are_disjoint_by_construction_and_from_every_paired_set(prepared: CycleDataModule):
    corpora = prepared.corpora
    translation = dict(zip(*(NumberPhrases(size=500).load()[side] for side in ("source", "target"))))
    english, italian = set(corpora["en"]["text"]), set(corpora["it"]["text"])
    assert len(english) > 100 and len(italian) > 100
    assert not {translation[sentence] for sentence in english} & italian  # no sentence's translation in the other
    for name in ("paired", "val", "test"):
        assert not set(corpora[name]["source"]) & english and not set(corpora[name]["target"]) & italian
    sets = [set(corpora[name]["source"]) for name in ("paired", "val", "test")]
    assert sum(map(len, sets)) == len(set.union(*sets)) == 100
    assert [len(corpora[name]) for name in ("paired", "val", "test")] == [40, 30, 30]


def test_both_directions_of_each_paired_set_hold_the_same_pairs(prepared: CycleDataModule):
    forward, backward = prepared.datasets["val-en-it"], prepared.datasets["val-it-en"]
    assert forward["source_text"] == backward["reference"] and forward["reference"] == backward["source_text"]


def test_a_training_batch_holds_a_pool_batch_per_language_and_a_pair_batch_per_direction(prepared: CycleDataModule):
    def sizes(data: CycleDataModule) -> dict[str, int]:
        batch = next(iter(data.train_dataloader()))
        return {name: len(part["text"] if "text" in part else part["reference"]) for name, part in batch.items()}

    assert sizes(prepared) == {"en": 8, "it": 8, "en-it": 8, "it-en": 8}
    fewer_pairs = numbers(prepared.cache_dir, paired_batch_size=3)  # same data settings: the prepared cache
    fewer_pairs.setup("fit")
    assert sizes(fewer_pairs) == {"en": 8, "it": 8, "en-it": 3, "it-en": 3}
    more_than_the_set = numbers(prepared.cache_dir, paired_batch_size=100)
    more_than_the_set.setup("fit")
    assert sizes(more_than_the_set)["en-it"] == 40


def test_the_recipes_length_limit_lets_every_real_translation_end(in_tmp: Path):
    """conf/cycle.yaml's synthetic length limit fits the longest true translation of every number phrase, both ways:
    a limit that cuts one off makes a translation that never ends, dropped, so back-translation never sees it.
    The earlier 1.5n + 5 cut off one in nine of the English translations of Italian numbers at vocab_size 1,000, and one
    in 24 at the recipe's 600."""
    cli = XLabCLI(["-c", str(ROOT / "conf" / "cycle.yaml")], run=False)
    data = cli.datamodule
    data.model_shapes()  # trains the tokenizer
    tokenizer = load_tokenizer(data.tokenizer_path)
    pairs = data.source.load()
    lengths = {
        side: [len(encoding.ids) + 1 for encoding in tokenizer.encode_batch(pairs[side])] for side in (SOURCE, TARGET)
    }
    directions = {"en-it": (lengths[SOURCE], lengths[TARGET]), "it-en": (lengths[TARGET], lengths[SOURCE])}
    earlier = SyntheticSources(length_scale=1.5, length_offset=5)
    for name, (inputs, outputs) in directions.items():
        assert not [n for n, m in zip(inputs, outputs) if m > cli.model.synthetic.limit(n)], name
    inputs, outputs = directions["it-en"]
    assert sum(m > earlier.limit(n) for n, m in zip(inputs, outputs)) > 0.03 * len(inputs)


def test_streams_cycle_each_pool_on_its_own_shuffled_and_resume_exactly():
    short, long = [{"ids": [i], "text": str(i)} for i in range(3)], [{"ids": [i], "text": str(i)} for i in range(50)]
    streams = PoolStreams({"short": (short, 2, collate_text), "long": (long, 2, collate_text)}, 0, 0, 1, ahead=0)
    batches = iter(streams)
    seen = [next(batches) for _ in range(9)]
    short_seen = [t for b in seen for t in b["short"]["text"]]
    assert [sorted(short_seen[i : i + 3]) for i in range(0, 18, 3)] == [["0", "1", "2"]] * 6  # each pass complete
    assert len({tuple(short_seen[i : i + 3]) for i in range(0, 18, 3)}) > 1  # and reshuffled
    long_seen = [t for b in seen for t in b["long"]["text"]]
    assert len(set(long_seen)) == 18  # the long pool went on without restarting with the short one
    resumed = PoolStreams({"short": (short, 2, collate_text), "long": (long, 2, collate_text)}, 0, 0, 1, ahead=0)
    resumed.load_state_dict(streams.state_dict())
    assert next(iter(resumed)) == next(batches)
    assert PoolStreams({"long": (long, 2, collate_text)}, 0, 0, 1).state_dict() == {"taken": {"long": 0}}
    ahead = PoolStreams({"long": (long, 2, collate_text)}, 0, 0, 1)
    fetched = iter(ahead)
    next(fetched), next(fetched)  # one trained on, one fetched ahead
    assert ahead.state_dict() == {"taken": {"long": 2}}


def test_streams_split_each_pool_between_processes():
    pool = [{"ids": [i], "text": str(i)} for i in range(10)]
    ranks = [PoolStreams({"p": (pool, 5, collate_text)}, 0, rank, 2) for rank in (0, 1)]
    first = [next(iter(streams))["p"]["text"] for streams in ranks]
    assert sorted(first[0] + first[1]) == sorted(str(i) for i in range(10))


def test_pools_from_local_text_files_without_the_paired_sentences(tmp_path: Path):
    prepared = numbers(tmp_path / "first")
    held_out = prepared.corpora["val"]["source"][0]
    english = tmp_path / "english.txt"
    english.write_text("\n".join([held_out, *(num2words(n) for n in range(1000, 1030))]) + "\n")
    data = numbers(tmp_path / "cache", source_text=LocalFiles([str(english)], sample_by="line"))
    pool = data.corpora["en"]["text"]
    assert len(pool) == 30 and held_out not in pool
    assert data.corpora["it"]["text"] == prepared.corpora["it"]["text"]  # the other pool still from the pairs


def test_parallel_files_split_into_disjoint_monolingual_halves(tmp_path: Path):
    """How conf/cycle-opus.yaml uses opus_books: a pair source whose spare rows give the two pools."""
    rows = [f"sentence {i}\tfrase {i}" for i in range(60)]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    data = CycleDataModule(
        ParallelFiles([str(tmp_path / "pairs.tsv")]), paired_size=10, val_size=5, test_size=5, cache_dir=str(tmp_path)
    )
    english = {s.split()[1] for s in data.corpora["en"]["text"]}
    italian = {s.split()[1] for s in data.corpora["it"]["text"]}
    assert len(english) == len(italian) == 20 and not english & italian


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"paired_size": 480}, "need 540 pairs"),
        ({"paired_size": 440}, "no monolingual en text"),
        ({"languages": ("en", "de")}, "do not match the source's target_lang"),
        ({"languages": ("en", "en")}, "two distinct languages"),
        ({"paired_batch_size": 0}, "paired_batch_size must be at least 1"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path: Path, options: dict, message: str):
    with pytest.raises(UserError, match=message):
        numbers(tmp_path, **options).model_shapes()
