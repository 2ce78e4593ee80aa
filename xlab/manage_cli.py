"""``./manage.py``: export checkpoints, inspect model files, write SLURM job scripts."""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from xlab.checkpoint import DTYPES, LoadedModel, export, is_export, load
from xlab.errors import UserError
from xlab.hf import default_output, export_hf
from xlab.models.transforms import reports
from xlab.slurm import LOG_DIR, TIME_FORMATS, Job, sbatch, submit, write_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manage.py", description="Export and inspect XLab models, write SLURM jobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    exporter = commands.add_parser(
        "export-checkpoint",
        help="weights + architecture + tokenizer as one safetensors file, safe to load and share, "
        "or as a Hugging Face transformers directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exporter.add_argument("checkpoint", type=Path, help="training checkpoint (.ckpt) or XLab export")
    exporter.add_argument(
        "--format",
        choices=("xlab", "hf"),
        default="xlab",
        help="xlab: one safetensors file for XLab's tools; hf: a directory that transformers' "
        "AutoModelForCausalLM and AutoTokenizer load (GPT-2 or Llama architectures)",
    )
    exporter.add_argument(
        "-o",
        "--output",
        type=Path,
        help="output file, or directory for hf (default: CHECKPOINT with .safetensors, or without suffix + -hf)",
    )
    exporter.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="precision of the stored weights")
    exporter.add_argument("--force", action="store_true", help="replace an existing output")
    folding = exporter.add_mutually_exclusive_group()
    folding.add_argument(
        "--plain",
        action="store_true",
        help="fold the network's transforms (model.init_args.transforms) into plain weights: a transform-free model",
    )
    folding.add_argument(
        "--genome",
        action="store_true",
        help="the compact form of a genomic (or low-rank) model: its genome and uncompressed weights, no "
        "predicted matrix (by default they are folded into plain weights)",
    )
    inspector = commands.add_parser("inspect", help="architecture, parameters, tokenizer and training progress")
    inspector.add_argument("path", type=Path, help="training checkpoint or export")
    add_slurm_parser(commands)
    return parser


def add_slurm_parser(commands: argparse._SubParsersAction) -> None:
    slurm = commands.add_parser(
        "slurm-script",
        help="write an sbatch file that trains a config on SLURM, and submit it",
        description="Write slurm/JOB_NAME.sbatch (srun xlab.py fit on NODES x devices, requeued on SIGUSR1 "
        "with the run resuming from its last.ckpt) and submit it with sbatch. "
        "Extra xlab.py overrides go after --.",
    )
    slurm.add_argument("-c", "--config", type=Path, action="append", required=True, help="xlab.py config (repeatable)")
    slurm.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one process each (default 0: CPUs)")
    slurm.add_argument("--tasks-per-node", type=int, help="processes per node on CPUs (default 1)")
    slurm.add_argument("--time", help=f"time limit: {TIME_FORMATS}")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--job-name", help="SLURM job name (default: the last config's name)")
    slurm.add_argument("--file", type=Path, help="the sbatch file (default slurm/JOB_NAME.sbatch)")
    slurm.add_argument("--force", action="store_true", help="replace an existing sbatch file")
    mode = slurm.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the file and the sbatch command; write nothing")
    mode.add_argument("--no-submit", action="store_true", help="write the file without submitting it")
    slurm.add_argument(
        "overrides", nargs="*", help="after --: overrides for xlab.py fit, e.g. --trainer.max_steps=2000"
    )


def slurm_script(args: argparse.Namespace) -> str:
    """Build the job from the options; print it (--dry-run), write it, or write and submit it."""
    job = Job(
        configs=tuple(args.config),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time=args.time,
        partition=args.partition,
        name=args.job_name,
        overrides=tuple(args.overrides),
    )
    path = args.file or job.default_path()
    script = job.script(Path.cwd())
    if args.dry_run:
        return f"{script}\nsbatch {path}"
    executable = None if args.no_submit else sbatch()
    write_script(path, script, args.force)
    if executable is None:
        return f"wrote {path}; submit it with: sbatch {path}"
    job_id = submit(executable, path)
    return f"submitted batch job {job_id}: {path}; its output goes to {LOG_DIR}/{job.job_name}-{job_id}.out and .err"


STACKS = ("blocks.", "encoder.", "decoder.", "models.")  # "models.": a cycle translator's one per direction


def describe(path: Path, loaded: LoadedModel) -> str:
    model, config = loaded.model, loaded.model.config
    kind = "export" if is_export(path) else "training checkpoint"
    lines = [
        f"file        {path} ({path.stat().st_size / 2**20:.1f} MiB, {kind})",
        f"model       {model.label}: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads "
        f"({config.n_kv_heads} key/value), d_ff {config.d_ff}, {config.activation}, {config.norm} "
        f"({config.norm_placement}-norm), {config.positions} positions, context {config.context_length} "
        f"of {config.max_positions}, vocab {config.vocab_size}, bias {config.bias}, tied {config.tie_embeddings}",
        f"parameters  {sum(p.numel() for p in model.parameters()):,} "
        f"({model.num_parameters():,} without embeddings), {next(model.parameters()).dtype}",
    ]
    by_module: dict[str, int] = defaultdict(int)
    for name, parameter in model.named_parameters():
        by_module[".".join(name.split(".")[:2]) if name.startswith(STACKS) else name.split(".")[0]] += parameter.numel()
    lines += [f"  {name:<12}{count:>14,}" for name, count in by_module.items()]
    if getattr(model, "directions", None):
        lines.append("directions  " + ", ".join(model.directions))
    if model.transforms:
        lines.append("transforms  " + ", ".join(map(repr, model.transforms)))
        lines += [f"  {line}" for line in reports(model)]
    specials = sum(token.special for token in loaded.tokenizer.get_added_tokens_decoder().values())
    lines.append(f"tokenizer   {loaded.tokenizer.get_vocab_size():,} tokens ({specials} special)")
    if loaded.source_tokenizer not in (None, loaded.tokenizer):
        lines.append(f"source      tokenizer of {loaded.source_tokenizer.get_vocab_size():,} tokens")
    if loaded.training:
        lines.append(
            "training    " + ", ".join(f"{key.replace('_', ' ')} {value:,}" for key, value in loaded.training.items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export-checkpoint" and args.format == "hf":
            output = args.output or default_output(args.checkpoint)
            export_hf(args.checkpoint, output, args.dtype, args.force)
            size = sum(file.stat().st_size for file in output.iterdir())
            print(f"wrote {output}/ ({size / 2**20:.1f} MiB): AutoModelForCausalLM.from_pretrained({str(output)!r})")
        elif args.command == "export-checkpoint":
            output = args.output or args.checkpoint.with_suffix(".safetensors")
            export(args.checkpoint, output, args.dtype, args.force, plain=args.plain, compact=args.genome)
            print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
        elif args.command == "slurm-script":
            print(slurm_script(args))
        else:
            print(describe(args.path, load(args.path)))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
