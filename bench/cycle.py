"""The cycle-consistency experiment: paired-only training against back-translation, per topology, over seeds.

Every variant trains conf/cycle.yaml's model on the same ``paired_size`` pairs for the same budget
(``--stop-at``, wall time by default, and ``--max-steps``), then tests its best checkpoint (by
paired val chrF) on the paired test set; the table gives, per direction, test exact match and
chrF as mean and standard deviation over ``--seeds``.

- ``paired``: the pairs only (the cycle loss weighs 0).
- ``two_models``, ``shared``, ``adapters``: the pairs plus back-translation on the monolingual
  pools (adapters with a trained base: from random weights a frozen base learns nothing).
- ``sample``, ``noised``: ``--best``'s topology with sampled or noised (word drop, filler,
  local shuffle) synthetic sources instead of greedy ones.
- ``confident``: ``--best``'s topology training each batch on only the more confident half of its greedy
  synthetic sources (by mean token log-probability).
- ``cold``: no pairs at all, to show what happens (synthetic outputs without an end kept, since a random
  model ends none; the copy rate is in the table).

Each run's test metrics are saved in git's tree (``bench/results/cycle-TAG/VARIANT-seedN.json``; its logs and
checkpoints go to ``runs/bench-cycle-TAG/``) and read back when the same ``--tag`` runs again with the same
settings, so the experiment (about 5 hours at 15 minutes a run) can be done in parts, from fresh clones:

    python bench/cycle.py --tag main --variants paired two_models shared
    python bench/cycle.py --tag main                 # trains only the variants and seeds not yet done; the whole table

Overrides after ``--`` go to every run, e.g. a smaller data set for a smoke test:

    python bench/cycle.py --seeds 0 1 2 --stop-at "15 min"
    python bench/cycle.py --variants paired shared --seeds 0 --max-steps 8 --stop-at "1 min" -- \\
        --data.init_args.source.init_args.size=2000 --data.init_args.val_size=32 --data.init_args.test_size=32
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import logged_values, saved_result  # noqa: E402
from xlab.cli import XLabCLI, quiet_third_party_noise  # noqa: E402

DIRECTIONS = ("en-it", "it-en")
ADAPTERS = "[{class_path: xlab.models.cycle_adapters.DirectionAdapters, init_args: {train_base: true}}]"
TOPOLOGIES = {
    "two_models": ["--model.init_args.implementation=two_models"],
    "shared": ["--model.init_args.implementation=shared"],
    "adapters": ["--model.init_args.implementation=adapters", f"--model.init_args.transforms={ADAPTERS}"],
}
SYNTHETIC = {
    "sample": ["--model.init_args.synthetic.strategy=sample", "--model.init_args.synthetic.top_k=10"],
    "noised": [
        "--model.init_args.synthetic.word_drop=0.1",
        "--model.init_args.synthetic.filler=0.1",
        "--model.init_args.synthetic.shuffle_distance=3",
    ],
    "confident": ["--model.init_args.synthetic.keep_confident=0.5"],
}
VARIANTS = ("paired", *TOPOLOGIES, *SYNTHETIC, "cold")
DIAGNOSTICS = ("copy_rate", "distinct_rate", "eos_rate", "length_ratio")
RECENT = 10  # a diagnostic is the mean of the last RECENT logged batches: one batch of 64 is noisy
# conf/cycle.yaml as the saved runs trained it, before its defaults became this experiment's findings (adapters, the
# trapezoid schedule, a longer synthetic length limit, the confident half, 100 pairs, a smaller vocabulary and pair
# batch): put before every run's overrides and not part of its saved settings, so the saved runs still mean what they
# say and a new default changes no result here.
BASE = [
    "--trainer.val_check_interval=500",
    "--model.init_args.implementation=two_models",
    "--model.init_args.transforms=[]",
    "--model.init_args.optimizer.schedule=cosine",
    "--model.init_args.mixing.cycle_start=1000",
    "--model.init_args.synthetic.strategy=greedy",
    "--model.init_args.synthetic.length_scale=1.5",
    "--model.init_args.synthetic.length_offset=5",
    "--model.init_args.synthetic.keep_confident=1.0",
    "--data.init_args.paired_size=300",
    "--data.init_args.vocab_size=1000",
    "--data.init_args.paired_batch_size=64",
]


def variant_overrides(variant: str, best: str) -> list[str]:
    if variant == "paired":
        return [*TOPOLOGIES["two_models"], "--model.init_args.mixing.cycle_weight=0"]
    if variant == "cold":
        return [
            *TOPOLOGIES[best],
            "--data.init_args.paired_size=0",
            "--model.init_args.mixing.cycle_start=0",
            "--model.init_args.mixing.paired_weight=0",
            "--model.init_args.synthetic.without_eos=keep",  # an untrained model ends no translation: drop keeps none
        ]
    return TOPOLOGIES.get(variant) or [*TOPOLOGIES[best], *SYNTHETIC[variant]]


def finished(variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """A run's results, read back when this tag has run it with the same settings, else trained now and saved."""
    saved = ROOT / "bench" / "results" / f"cycle-{args.tag}" / f"{variant}-seed{seed}.json"
    overrides = run_overrides(variant, seed, args)
    return saved_result(saved, overrides, lambda: run(variant, seed, overrides, args.tag))


def run_overrides(variant: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The xlab.py overrides of one variant's run with one seed."""
    return [
        f"--seed_everything={seed}",
        f"--model.init_args.seed={seed}",
        f"--trainer.max_steps={args.max_steps}",
        f"--loop.stop_at={args.stop_at}",
        "--trainer.enable_progress_bar=false",
        *args.overrides,
        *variant_overrides(variant, args.best),  # last: what makes the variant wins over the common overrides
    ]


def run(variant: str, seed: int, overrides: list[str], tag: str) -> dict[str, float]:
    """Train one variant with one seed, test its best checkpoint; the test metrics and the wall seconds."""
    name = f"bench-cycle-{tag}/{variant}-seed{seed}"
    started = time.monotonic()
    config = str(ROOT / "conf" / "cycle.yaml")
    cli = XLabCLI(["fit", "-c", config, f"--trainer.logger.init_args.name={name}", *BASE, *overrides])
    seconds = time.monotonic() - started
    diagnostics = recent_diagnostics(Path(cli.trainer.log_dir) / "metrics.csv")
    updates = cli.trainer.global_step
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("test/")}
    return {**metrics, **diagnostics, "updates": updates, "seconds": seconds}


def recent_diagnostics(metrics_csv: Path) -> dict[str, float]:
    """Per generating direction, the synthetic outputs' copy, distinct-output and end-of-sequence rates and length
    ratio over the run's last logged batches (none for a run without back-translation)."""
    diagnostics = {}
    if not metrics_csv.exists():  # a run too short to log
        return diagnostics
    for direction in DIRECTIONS:
        for name in DIAGNOSTICS:
            values = logged_values(metrics_csv, f"train/{direction}/{name}")[-RECENT:]
            if values:
                diagnostics[f"train/{direction}/{name}"] = statistics.fmean(values)
    return diagnostics


def spread(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    return f"{mean:6.1f} ± {statistics.stdev(values) * scale:4.1f}" if len(values) > 1 else f"{mean:6.1f}       "


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Test exact match and chrF per direction, and each generating direction's synthetic copy rate (- without
    back-translation), as mean ± standard deviation over the seeds."""
    columns = [f"{d} {m}" for d in DIRECTIONS for m in ("exact %", "chrF")] + [f"{d} copy %" for d in DIRECTIONS]
    lines = [f"{'variant':<12} {'seeds':>5} {'minutes':>8} {'updates':>8}  " + "  ".join(f"{c:>14}" for c in columns)]
    for variant, runs in results.items():
        cells = []
        for direction in DIRECTIONS:
            cells.append(spread([r[f"test/{direction}/exact_match"] for r in runs], 100))
            cells.append(spread([r[f"test/{direction}/chrf"] for r in runs]))
        for direction in DIRECTIONS:
            cells.append(spread([r[key] for r in runs if (key := f"train/{direction}/copy_rate") in r], 100))
        minutes = statistics.fmean(r["seconds"] for r in runs) / 60
        updates = statistics.fmean(r["updates"] for r in runs)
        row = f"{variant:<12} {len(runs):>5} {minutes:>8.1f} {updates:>8.0f}  "
        lines.append(row + "  ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--best", choices=tuple(TOPOLOGIES), default="two_models", help="the sample/noised/confident/cold topology"
    )
    parser.add_argument("--stop-at", default="15 min", help="each run's budget (loop.stop_at)")
    parser.add_argument("--max-steps", type=int, default=100_000, help="and its step limit (trainer.max_steps)")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="runs go to runs/bench-cycle-TAG/")
    parser.add_argument("overrides", nargs="*", help="after --: xlab.py overrides for every run")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # each run's options go to the CLI as its args, not through sys.argv
    quiet_third_party_noise()
    results = {variant: [finished(variant, seed, args) for seed in args.seeds] for variant in args.variants}
    print(table(results))


if __name__ == "__main__":
    main()
