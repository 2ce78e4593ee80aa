"""Training memory with and without activation checkpointing (``arch.activation_checkpointing``).

Each variant trains the default experiment's model shape for a few steps (forward, next-token loss,
backward, the LanguageModel's AdamW) in a fresh process, so one variant's peak cannot hide the
other's. On CPU the figure is the process's peak resident memory (``ru_maxrss``) during training
less its resident memory just before it (model and batch in place; AdamW's state, made by the first
step, and the logits, which checkpointing does not touch, count in both); on CUDA it is
``torch.cuda.max_memory_allocated`` less the memory allocated before the first step. Tokens/s of
the same steps come beside it, since checkpointing trades compute for memory. The reference is the
plain network in the same run.

    python bench/activation_memory.py                       # the default experiment's model, batch 16
    python bench/activation_memory.py --batch 32 --layers 8
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_model_arguments, model_config, pick_device, synchronize  # noqa: E402

from xlab.models.lm import LanguageModel, OptimizerConfig  # noqa: E402
from xlab.models.losses import next_token_loss  # noqa: E402

VARIANTS = {"plain": False, "activation checkpointing": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, context=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is warm-up)")
    parser.add_argument("--child", choices=("plain", "checkpointed"), help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(args: argparse.Namespace, checkpointed: bool) -> dict[str, float]:
    """Extra peak memory (MiB) of training steps over what is resident before them, and tokens/s after the first."""
    device = pick_device(args.device)
    torch.manual_seed(0)
    config = replace(model_config(args), activation_checkpointing=checkpointed)
    module = LanguageModel(config, OptimizerConfig(decay_steps=1)).to(device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    tokens = torch.randint(args.vocab, (args.batch, args.context + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resident_bytes()
    start = 0.0
    for step in range(args.steps):
        if step == 1:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        next_token_loss(module.model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_resident_bytes()
    return {"extra_mib": (peak - before) / 2**20, "tokens_per_s": (args.steps - 1) * tokens[:, 1:].numel() / seconds}


def resident_bytes() -> int:
    """The process's resident memory now (Linux)."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args, args.child == "checkpointed")))
        return 0
    if args.steps < 2:
        sys.exit("error: --steps must be at least 2 (the first is warm-up)")
    results = {}
    for name, checkpointed in VARIANTS.items():
        child = [sys.executable, __file__, *sys.argv[1:], "--child", "checkpointed" if checkpointed else "plain"]
        run = subprocess.run(child, capture_output=True, text=True, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    device = pick_device(args.device)
    memory = "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS"
    print(
        f"device {device}, torch {torch.__version__}; model {args.layers} layers, d_model {args.d_model}, "
        f"context {args.context}, vocab {args.vocab}, batch {args.batch}; {args.steps} steps per variant"
    )
    header = f"{'variant':<26}{'training MiB':>14}{'vs plain':>10}{'tokens/s':>11}{'vs plain':>10}"
    print(f"\n{memory} during training, over what was resident before it\n{header}\n{'-' * len(header)}")
    plain = results["plain"]
    for name, result in results.items():
        print(
            f"{name:<26}{result['extra_mib']:>14,.1f}{result['extra_mib'] / plain['extra_mib']:>9.2f}x"
            f"{result['tokens_per_s']:>11,.0f}{result['tokens_per_s'] / plain['tokens_per_s']:>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
