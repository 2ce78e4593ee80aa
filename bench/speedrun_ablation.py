"""The speedrun ablation: a recipe, then the recipe with one change reverted at a time, all for the same wall time.

Each variant is trained with ``./xlab.py fit`` under the same ``loop.stop_at`` budget (the
schedule decays over it), its last checkpoint tested with ``./xlab.py test``, and the table
gives each variant's final val and test bits per byte (from the runs' ``metrics.csv``) and the
wall time of its whole ``fit`` command, as the mean over seeds (and the range, with several).
The first run also prepares the data; later ones reuse its cache, so compare times from the
second row on, or prepare first (``./xlab.py prepare -c RECIPE``). Runs go to
``runs/PREFIX-VARIANT-seedN``; run on an otherwise idle machine.

    python bench/speedrun_ablation.py                                   # conf/xlab.yaml, 10 min each
    python bench/speedrun_ablation.py --budget "5 min" --seeds 0 1 --variants recipe adamw gelu
    python bench/speedrun_ablation.py --override=--data.init_args.batch_size=8
"""

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import last_value  # noqa: E402

MODEL = "--model.init_args"

# One change reverted at a time; "old-default" is the previous default experiment instead of the recipe.
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "adamw": [f"{MODEL}.optimizer.name=adamw"],
    "no-qk-norm": [f"{MODEL}.arch.qk_norm=false"],
    "gelu": [f"{MODEL}.arch.activation=gelu"],
    "cosine": [f"{MODEL}.optimizer.schedule=cosine"],
    "tied-head": [f"{MODEL}.arch.tie_embeddings=true"],
    # a dotted key set to null fails jsonargparse's Optional check inside a subclass; the dict form merges
    "no-softcap": [f'{MODEL}.arch={{"logit_softcap": null}}'],
    "no-zero-init": [f"{MODEL}.arch.zero_init_projections=false"],
    "context-256": ["--data.init_args.context_length=256", "--data.init_args.batch_size=16"],  # the same tokens a step
    "old-default": [],
}
OLD_DEFAULT = ROOT / "conf" / "classic.yaml"


@dataclass
class Result:
    variant: str
    seed: int
    val_bpb: float
    test_bpb: float
    seconds: float


def run_xlab(*args: str) -> float:
    """Run ``./xlab.py ARGS`` in the repository; its wall seconds, or exit with its error."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "xlab.py"), *args], cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"error: ./xlab.py {' '.join(args)} failed with exit code {done.returncode}")
    return time.monotonic() - started


def run_variant(variant: str, seed: int, args: argparse.Namespace) -> Result:
    """Train and test one variant for one seed."""
    config = OLD_DEFAULT if variant == "old-default" else Path(args.recipe)
    name = f"{args.prefix}-{variant}-seed{seed}"
    common = ["-c", str(config), *VARIANTS[variant], *args.override, f"--seed_everything={seed}"]
    seconds = run_xlab("fit", *common, f"--loop.stop_at={args.budget}", f"--trainer.logger.init_args.name={name}")
    checkpoint = ROOT / "runs" / name / "checkpoints" / "last.ckpt"
    run_xlab("test", *common, f"--ckpt_path={checkpoint}", f"--trainer.logger.init_args.name={name}-test")
    return Result(
        variant,
        seed,
        val_bpb=last_value(ROOT / "runs" / name / "metrics.csv", "val/bits_per_byte"),
        test_bpb=last_value(ROOT / "runs" / f"{name}-test" / "metrics.csv", "test/bits_per_byte"),
        seconds=seconds,
    )


def summary(values: list[float], digits: int) -> str:
    """The mean, with the range over seeds when there are several."""
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: list[Result], budget: str, seeds: list[int]) -> str:
    lines = [
        f"budget loop.stop_at={budget}, seeds {', '.join(map(str, seeds))}; mean (range) over seeds",
        "| variant | val bits/byte | test bits/byte | fit wall time (s) |",
        "|---|---|---|---|",
    ]
    for variant in dict.fromkeys(result.variant for result in results):
        rows = [result for result in results if result.variant == variant]
        lines.append(
            f"| {variant} | {summary([r.val_bpb for r in rows], 3)} | {summary([r.test_bpb for r in rows], 3)} "
            f"| {summary([r.seconds for r in rows], 0)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "conf" / "xlab.yaml"), help="the config to ablate")
    parser.add_argument("--budget", default="10 min", help="loop.stop_at of every run (default: 10 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--prefix", default=time.strftime("ablation-%Y%m%d-%H%M%S"), help="run names' prefix")
    parser.add_argument(
        "--override", action="append", default=[], help="an xlab.py override for every run (repeatable)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = [run_variant(variant, seed, args) for variant in args.variants for seed in args.seeds]
    print(table(results, args.budget, args.seeds))


if __name__ == "__main__":
    main()
