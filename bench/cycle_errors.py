"""Where a number-phrase translator's test errors are: exact match per kind of phrase, per direction.

A cycle checkpoint (``conf/cycle.yaml``'s data, or the overrides it was trained with) translates its
test pairs greedily both ways; each pair is counted under its kind (cardinal, ordinal, year, euro
amount, told by the English side), and Italian->English also under the Italian phrases that
name a year and a cardinal alike ("millenovecentonovantanove" is 1999 as both, "nineteen
ninety-nine" or "one thousand, nine hundred and ninety-nine"), where the source cannot say which:

    python bench/cycle_errors.py runs/cycle/checkpoints/best.ckpt
    python bench/cycle_errors.py CKPT -- --data.init_args.paired_size=150
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from num2words import num2words  # noqa: E402

from xlab.checkpoint import LoadedModel, load  # noqa: E402
from xlab.cli import XLabCLI, quiet_third_party_noise  # noqa: E402
from xlab.data.pairs import SOURCE, TARGET  # noqa: E402
from xlab.errors import UserError  # noqa: E402
from xlab.generation import GenerationConfig, translate  # noqa: E402
from xlab.models.metrics import corpus_scores  # noqa: E402

YEARS = range(1000, 2100)  # NumberPhrases' years
ORDINALS = range(1, 10_000)  # its ordinals, 1 to 4 digits


def english_kinds() -> dict[str, str]:
    """The kind of every English year and ordinal phrase NumberPhrases can say (the rest: euro or cardinal)."""
    kinds = {num2words(value, lang="en", to="ordinal"): "ordinal" for value in ORDINALS}
    kinds.update({num2words(value, lang="en", to="year"): "year" for value in YEARS})
    return kinds


def kind(english: str, known: dict[str, str]) -> str:
    return "euro" if "euro" in english else known.get(english, "cardinal")


def translations(loaded: LoadedModel, direction: str, sources: list[str]) -> list[str]:
    """Greedy translations of ``sources`` by the loaded cycle model's ``direction``."""
    model, config = loaded.model.direction(direction), GenerationConfig(max_new_tokens=64)
    return [rows[0].text for rows in translate(model, loaded.tokenizer, loaded.tokenizer, sources, config)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--config", default=str(ROOT / "conf" / "cycle.yaml"))
    parser.add_argument("overrides", nargs="*", help="after --: the run's xlab.py data overrides")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    quiet_third_party_noise()
    loaded = load(args.checkpoint)  # first: a bad path fails before the data is prepared
    loaded.model.eval()
    data = XLabCLI(["-c", args.config, *args.overrides], run=False).datamodule
    test = data.corpora["test"]
    english, italian = list(test[SOURCE]), list(test[TARGET])
    known = english_kinds()
    ambiguous = {num2words(value, lang="it", to="year") for value in YEARS}
    print(f"{'direction':<10} {'phrases':<24} {'pairs':>6} {'exact %':>8} {'chrF':>6}")
    for direction, sources, references in (("en-it", english, italian), ("it-en", italian, english)):
        outputs = translations(loaded, direction, sources)
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for en, it, output, reference in zip(english, italian, outputs, references):
            names = ["all", kind(en, known)]
            if direction == "it-en" and it in ambiguous:
                names.append("Italian year = cardinal")
            for name in names:
                groups[name].append((output, reference))
        for name, pairs in groups.items():
            scores = corpus_scores(*zip(*pairs))
            exact, chrf = 100 * scores["exact_match"], scores["chrf"]
            print(f"{direction:<10} {name:<24} {len(pairs):>6} {exact:>8.1f} {chrf:>6.1f}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a missing or corrupt checkpoint, bad settings: one line, no traceback
        sys.exit(f"error: {error}")
