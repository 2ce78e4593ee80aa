"""The genomic bottleneck's experiment: validation bits per byte against the compression of the block matrices.

Each point trains the previous default experiment (``conf/classic.yaml``, or ``--config``) on the same token budget in a
fresh ``xlab.py fit`` process, once per seed: the dense model (1x); per-tile genomes (torchGB's layout) and
shared genomes (depth 2, evaluated 16 tiles at a time) of several widths; and beside a per-tile genome of a
given width, the baselines that say whether a genome is worth it, at its parameter count: a low-rank
factorisation of the same matrices (the rank whose factors are closest to the genome's parameters) and a
smaller dense model (the d_model whose total is closest to the genomic model's); and a genome fitted to the
dense run's weights (``init_from``) and then trained on the same budget, for how much of the dense model's
quality a genome keeps when it starts from a trained one. The table gives the exact
compression of the matrices and of the whole model (the transform's report, read from the run's checkpoint),
the last validation bits per byte and its ratio to dense (mean over seeds), tokens/s, and peak memory (CUDA:
``max_memory_allocated`` during training; CPU: the process's peak resident memory, data preparation included,
so only a rough figure).

A shared g-net runs for every weight, so its cost grows with its width squared: at width 512 a prediction is
about 2 x 3.1M x 512^2 FLOPs (about 1.6 TFLOP, more than a training step of the dense model), made once per
optimizer step and recomputed chunk by chunk in the backward.

With ``--workdir``, a run that has finished there with the same settings is read back rather than trained
again (one of other settings is an error), so a sweep can be resumed or a point given more seeds. A
translator config (``conf/translate.yaml``) trains its dense and genome points the same way, and each is then
tested: the table adds test chrF and exact match.

    python bench/genomic.py                                 # 3.3M tokens (conf/classic.yaml's 800 steps), seed 42
    python bench/genomic.py --tokens 10e6 --seeds 1 2 --device cuda
    python bench/genomic.py --tokens 8192 --points dense per_tile:8 low_rank:8 small_dense:8    # a smoke test
    python bench/genomic.py --config conf/translate.yaml --steps 800 --points dense per_tile:32 per_tile:8
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import last_value, logged_values, saved_result  # noqa: E402
from xlab.checkpoint import load  # noqa: E402
from xlab.models.config import TransformerConfig  # noqa: E402
from xlab.models.decoder import Decoder  # noqa: E402
from xlab.models.genomic import GenomicBottleneck, LowRank  # noqa: E402
from xlab.models.network import build_network  # noqa: E402

GENOME, LOW_RANK = "xlab.models.genomic.GenomicBottleneck", "xlab.models.genomic.LowRank"
DENSE_CHECKPOINT = "DENSE_CHECKPOINT"  # in a point's overrides: the same seed's dense run's last.ckpt
POINTS = [
    "dense",
    *(f"per_tile:{width}" for width in (256, 64, 32, 8)),
    *(f"shared:{width}" for width in (512, 256, 128, 64)),
    *(f"low_rank:{width}" for width in (64, 32, 8)),
    *(f"small_dense:{width}" for width in (64, 32, 8)),
    "fitted:32",
]


class PeakMemory(Callback):
    """Writes ``path``: the training's peak memory in bytes (CUDA allocations, or the process's resident memory)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.path.write_text(json.dumps(peak))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=lambda text: Path(text).resolve(), default=ROOT / "conf" / "classic.yaml")
    parser.add_argument("--tokens", type=float, default=3.3e6, help="training tokens per run")
    parser.add_argument("--steps", type=int, help="training steps per run, instead of --tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument(
        "--points",
        nargs="+",
        default=POINTS,
        help="dense, per_tile:WIDTH, shared:WIDTH, low_rank:WIDTH and small_dense:WIDTH (matched to the "
        "per-tile genome of that width), fitted:WIDTH (that genome fitted to the dense run's weights, then "
        "trained on the same budget; after dense)",
    )
    parser.add_argument("--fit-steps", type=int, default=500, help="a fitted point's regression steps on the weights")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--workdir", type=Path, help="where runs/ and cache/ go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="after --: more xlab.py overrides for every run")
    return parser.parse_args()


def configured(config: Path) -> tuple[TransformerConfig, int]:
    """The architecture ``config`` trains (with its data's vocabulary and context) and its tokens per step."""
    settings = yaml.safe_load(config.read_text())
    data = settings["data"]["init_args"]
    shape = settings["model"]["init_args"]["arch"]
    arch = TransformerConfig(vocab_size=data["vocab_size"], context_length=data["context_length"], **shape)
    return arch, data["batch_size"] * data["context_length"]


def report(arch: TransformerConfig, transform: GenomicBottleneck | LowRank) -> dict:
    """The transform's counts on the architecture (built on the CPU: the genome's scale is measured)."""
    return transform.report(build_network(Decoder, arch, [transform]))


def total(arch: TransformerConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(arch).parameters())


def genome(layout: str, width: int) -> dict:
    """A per-tile genome of one hidden layer (torchGB's), or a shared one of two, in chunks of 16 tiles."""
    if layout == "shared":
        return {"layout": layout, "width": width, "depth": 2, "chunk_tiles": 16}
    return {"layout": layout, "width": width}


def transform_override(class_path: str, settings: dict) -> str:
    return f"--model.init_args.transforms=[{json.dumps({'class_path': class_path, 'init_args': settings})}]"


def point(name: str, arch: TransformerConfig, fit_steps: int) -> tuple[str, list[str]]:
    """A label and the xlab.py overrides of the point ``name`` (see --points)."""
    kind, _, value = name.partition(":")
    if kind == "dense":
        return "dense", []
    width = int(value)
    if kind in ("per_tile", "shared"):
        return f"{kind} genome, width {width}", [transform_override(GENOME, genome(kind, width))]
    if kind == "fitted":
        settings = {**genome("per_tile", width), "init_from": DENSE_CHECKPOINT, "fit_steps": fit_steps}
        return f"per_tile genome, width {width}, fitted to dense", [transform_override(GENOME, settings)]
    target = report(arch, GenomicBottleneck(**genome("per_tile", width)))
    if kind == "low_rank":
        rank = max(1, round(target["stored"] / report(arch, LowRank(rank=1))["stored"]))
        return f"low rank {rank} (~per-tile {width})", [transform_override(LOW_RANK, {"rank": rank})]
    if kind != "small_dense":
        raise SystemExit(f"error: unknown point {name!r}: see --points")

    def distance(d_model: int) -> int:
        return abs(total(TransformerConfig(**{**vars(arch), "d_model": d_model, "d_ff": None})) - target["compressed"])

    d_model = min(range(arch.n_heads, arch.d_model, arch.n_heads), key=distance)
    return f"dense d_model {d_model} (~per-tile {width})", [f"--model.init_args.arch.d_model={d_model}"]


def shared_arguments(seed: int, overrides: list[str], args: argparse.Namespace) -> list[str]:
    """The xlab.py arguments of one point's run that its fit and its test share."""
    common = ["-c", str(args.config), f"--seed_everything={seed}", f"--trainer.accelerator={args.device}"]
    return [*common, "--trainer.enable_progress_bar=false", *overrides, *args.overrides]


def train(run: str, common: list[str], steps: int, workdir: Path) -> dict:
    """Train one run (and test it, for a translator); its counts, last val bits per byte, tokens/s and peak memory."""
    memory = workdir / f"{run}.memory.json"
    xlab("fit", *common, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
         f"--trainer.logger.init_args.name={run}", "--trainer.callbacks+=genomic.PeakMemory",
         f"--trainer.callbacks.path={memory}", run=run, workdir=workdir)
    directory = workdir / "runs" / run
    speeds = logged_values(directory / "metrics.csv", "train/tokens_per_sec")
    model = load(directory / "checkpoints" / "last.ckpt").model
    counts = next((t.report(model) for t in model.transforms), None) or {"ratio": None, "model_ratio": None}
    counts["parameters"] = sum(p.numel() for p in model.parameters())
    if logged_values(directory / "metrics.csv", "val/chrf"):  # a translator: its decoded test scores
        xlab("test", *common, f"--ckpt_path={directory / 'checkpoints' / 'last.ckpt'}",
             f"--trainer.logger.init_args.name={run}-test", run=run, workdir=workdir)
        tested = workdir / "runs" / f"{run}-test" / "metrics.csv"
        counts |= {name: last_value(tested, f"test/{name}") for name in ("chrf", "exact_match")}
    return {
        **counts,
        "bits_per_byte": last_value(directory / "metrics.csv", "val/bits_per_byte"),
        "tokens_per_sec": statistics.mean(speeds) if speeds else float("nan"),
        "peak_mib": json.loads(memory.read_text()) / 2**20,
    }


def xlab(*arguments: str, run: str, workdir: Path) -> None:
    """Run ``xlab.py ARGUMENTS`` for ``run`` in ``workdir`` (bench/ importable, for PeakMemory), or exit saying why."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")))}
    command = [sys.executable, str(ROOT / "xlab.py"), *arguments]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"error: xlab.py {arguments[0]} of {run} failed:\n{result.stderr[-3000:]}")


def finished(run: str, seed: int, steps: int, overrides: list[str], args: argparse.Namespace, workdir: Path) -> dict:
    """A run's results, read back from ``workdir`` when it has finished there with the same settings, else trained
    now and saved."""
    common = shared_arguments(seed, overrides, args)
    settings = [*common, f"--trainer.max_steps={steps}"]
    return saved_result(workdir / "runs" / f"{run}.result.json", settings, lambda: train(run, common, steps, workdir))


def run_name(point_name: str, seed: int) -> str:
    return f"{point_name.replace(':', '-')}-seed{seed}"


def main() -> None:
    args = parse_args()
    arch, tokens_per_step = configured(args.config)
    steps = args.steps or max(1, round(args.tokens / tokens_per_step))
    fitted = [name for name in args.points if name.startswith("fitted")]
    if fitted and ("dense" not in args.points or args.points.index("dense") > args.points.index(fitted[0])):
        raise SystemExit("error: a fitted point starts from the dense run: list dense before it")
    points = [point(name, arch, args.fit_steps) for name in args.points]
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        results: dict[str, list[dict]] = {}
        for name, (label, overrides) in zip(args.points, points):
            results[label] = []
            for seed in args.seeds:
                dense = workdir / "runs" / run_name("dense", seed) / "checkpoints" / "last.ckpt"
                chosen = [override.replace(DENSE_CHECKPOINT, str(dense)) for override in overrides]
                results[label].append(finished(run_name(name, seed), seed, steps, chosen, args, workdir))
    print(f"{steps} steps of {tokens_per_step:,} tokens per run, seeds {args.seeds}, {args.config.name}")
    print(table(results))


def table(results: dict[str, list[dict]]) -> str:
    """The Markdown table of the points: means over seeds (± their spread for val bits per byte)."""
    dense_runs = results.get("dense", [{"bits_per_byte": float("nan"), "parameters": float("nan")}])
    dense = statistics.mean(run["bits_per_byte"] for run in dense_runs)
    tested = all("chrf" in run for runs in results.values() for run in runs)
    extra = " test chrF | test exact % |" if tested else ""
    lines = [f"| point | parameters | matrices x | model x | val bits/byte | vs dense | tokens/s | peak MiB |{extra}"]
    lines.append("|---" * (8 + 2 * tested) + "|")
    for label, runs in results.items():
        bits = [run["bits_per_byte"] for run in runs]
        spread = f" ± {statistics.stdev(bits):.3f}" if len(bits) > 1 else ""
        first = runs[0]
        matrices = f"{first['ratio']:.1f}" if first["ratio"] else "-"  # dense models compress no matrix
        model_ratio = first["model_ratio"] or dense_runs[0]["parameters"] / first["parameters"]
        line = (
            f"| {label} | {first['parameters']:,} | {matrices} | {model_ratio:.2f} | "
            f"{statistics.mean(bits):.3f}{spread} | {statistics.mean(bits) / dense:.3f} | "
            f"{statistics.mean(run['tokens_per_sec'] for run in runs):,.0f} | "
            f"{max(run['peak_mib'] for run in runs):,.0f} |"
        )
        if tested:
            chrf, exact = (statistics.mean(run[name] for run in runs) for name in ("chrf", "exact_match"))
            line += f" {chrf:.1f} | {100 * exact:.1f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
