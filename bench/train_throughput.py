"""Training throughput: XLab's model step against Hugging Face GPT-2, and the whole training loop around it.

Rows, all at the same shape, batch and precision, with the same torch threads:

- ``XLab model step``: forward + loss + backward + AdamW (XLab's settings, from
  ``LanguageModel.configure_optimizers``) on one fixed random batch; no dropout.
- ``transformers GPT-2``: GPT2LMHeadModel of the same architecture (learned positions,
  pre-LayerNorm, exact GELU, biases, tied embeddings), the same step. The reference of the model.
- ``plain PyTorch loop``: the loop a user who leaves Lightning would write, in nanoGPT's shape
  (bench/loops.py): batches from a memmapped token file, the schedule set each step, gradient
  clipping, AdamW. The reference of the loop.
- ``XLab model step, compiled``: the model step through ``torch.compile`` (``--no-compile``: not).
- ``XLab model step, dropout 0.1``: what dropout costs, eager and compiled (``--dropout 0``: not).
- ``./xlab.py fit`` (and ``compile: true``): the whole command, conf/classic.yaml at this shape without
  dropout or validation, in a subprocess between the two halves of the rounds; its tokens/s as it
  logs them itself (``train/tokens_per_sec``) after warm-up (``--no-fit``: not).

After warm-up the in-process rows take turns in rounds (A B C, C B A, ...); the table gives each
row's median round, its model FLOPs utilisation (MFU: ``Decoder.flops_per_token()`` x tokens/s,
over the best matmul FLOP/s this machine showed in the run, in the run's compute dtype) and the
median over rounds of its speed relative to each reference in the same round (for a fit row: over
the reference's median). On CPU it warns when other processes took the cores: the figures are then
not worth reading.

transformers, the reference, is pinned in requirements.txt (bench/requirements.txt includes it):

    pip install -r bench/requirements.txt
    python bench/train_throughput.py                       # fp32, the default experiment's model
    python bench/train_throughput.py --precision bf16      # under torch.autocast bf16 (CPU or CUDA)
    python bench/train_throughput.py --device cuda --batch 32 --steps 20
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_model_arguments, model_config, synchronize, transformers_and_device  # noqa: E402
from loops import fit_tokens_per_second, plain_loop_step, token_file  # noqa: E402

from xlab.models.config import TransformerConfig  # noqa: E402
from xlab.models.lm import LanguageModel, OptimizerConfig  # noqa: E402
from xlab.models.losses import next_token_loss  # noqa: E402
from xlab.models.schedule import WarmupDecay  # noqa: E402

Step = Callable[[], None]
REFERENCE = "transformers GPT-2"
MODEL_STEP = "XLab model step"
PLAIN_LOOP = "plain PyTorch loop"
FIT_LOOP = "./xlab.py fit"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, context=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-fit", dest="fit", action="store_false", help="skip the ./xlab.py fit rows")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--dropout", type=float, default=0.1, help="the dropout row's rate (0: no such row)")
    return parser.parse_args()


def gpt2_like(config: TransformerConfig) -> nn.Module:
    """transformers' GPT2LMHeadModel shaped like ``config``, whose other options are XLab's defaults (GPT-2's)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_positions,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_ff,
        activation_function="gelu",  # exact GELU, as XLab's nn.GELU() (GPT-2's own default is the tanh one)
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
    )
    hf_config._attn_implementation = "sdpa"  # F.scaled_dot_product_attention, as XLab
    return GPT2LMHeadModel(hf_config)


def like_optimizer(model: nn.Module, reference: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An AdamW for ``model`` with the reference's settings and grouping (weight decay on matrices only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": reference.param_groups[0]["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    settings = {key: reference.defaults[key] for key in ("lr", "betas", "eps", "foreach", "fused")}
    return torch.optim.AdamW(groups, **settings)


def training_step(
    logits_of: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    tokens: Tensor,
    autocast: Callable[[], AbstractContextManager],
) -> Step:
    """One next-token training step on ``tokens`` (batch, context + 1)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = logits_of(inputs)
        next_token_loss(logits, targets).backward()
        optimizer.step()

    return step


def matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best FLOP/s of a large square matmul over a few tries: the machine's practical peak for ``dtype``."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def time_steps(step: Step, steps: int, device: torch.device) -> tuple[float, float]:
    """Wall seconds of ``steps`` steps, and the share of its threads' time this process got (CPU)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    wall = time.perf_counter() - start
    return wall, (time.process_time() - cpu_start) / (wall * torch.get_num_threads())


def step_rows(
    args: argparse.Namespace, device: torch.device, autocast: Callable[[], AbstractContextManager], directory: Path
) -> tuple[dict[str, Step], LanguageModel]:
    """The rows timed in this process, each a step over its own copy of the same initial model, and that model."""
    config = model_config(args)

    def fresh(dropout: float = 0.0) -> tuple[LanguageModel, torch.optim.Optimizer]:
        torch.manual_seed(0)
        lm = LanguageModel(replace(config, dropout=dropout), OptimizerConfig(decay_steps=1)).to(device)
        return lm, lm.configure_optimizers()["optimizer"]

    lm, optimizer = fresh()
    hf_model = gpt2_like(config).to(device)
    if sum(p.numel() for p in lm.model.parameters()) != sum(p.numel() for p in hf_model.parameters()):
        sys.exit("error: the two models differ in parameter count: not the same architecture")
    tokens = torch.randint(args.vocab, (args.batch, args.context + 1), device=device)
    hf_optimizer = like_optimizer(hf_model, optimizer)
    hf_step = training_step(lambda x: hf_model(input_ids=x).logits, hf_optimizer, tokens, autocast)
    steps = {MODEL_STEP: training_step(lm.model, optimizer, tokens, autocast), REFERENCE: hf_step}
    plain, plain_optimizer = fresh()
    schedule = WarmupDecay(OptimizerConfig.warmup_steps, 10_000, OptimizerConfig.min_lr_ratio)
    data = token_file(directory, args.vocab)
    steps[PLAIN_LOOP] = plain_loop_step(
        plain.model, plain_optimizer, schedule, data, args.batch, args.context, device, autocast
    )
    if args.compile:
        compiled, compiled_optimizer = fresh()
        steps[f"{MODEL_STEP}, compiled"] = training_step(
            torch.compile(compiled.model), compiled_optimizer, tokens, autocast
        )
    if args.dropout:
        dropped, dropped_optimizer = fresh(args.dropout)
        steps[f"{MODEL_STEP}, dropout {args.dropout}"] = training_step(
            dropped.model, dropped_optimizer, tokens, autocast
        )
    if args.dropout and args.compile:  # inductor draws dropout's masks in its own generated kernels
        dropped, dropped_optimizer = fresh(args.dropout)
        steps[f"{MODEL_STEP}, dropout {args.dropout}, compiled"] = training_step(
            torch.compile(dropped.model), dropped_optimizer, tokens, autocast
        )
    return steps, lm


def main() -> int:
    args = parse_args()
    transformers_version, device = transformers_and_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    with tempfile.TemporaryDirectory() as directory:
        steps, lm = step_rows(args, device, autocast, Path(directory))
        for step in steps.values():
            time_steps(step, args.warmup, device)
        rates: dict[str, list[float]] = {name: [] for name in steps}
        peaks, cpu_shares = [], []
        fit_rates: dict[str, float] = {}
        for round_ in range(args.rounds):
            if round_ == args.rounds // 2 and args.fit:  # the whole command, between the two halves of the rounds
                fit_rates[FIT_LOOP], fit_vocab = fit_tokens_per_second(args, args.rounds * args.steps, args.warmup)
                if args.compile:
                    fit_rates[f"{FIT_LOOP}, compile: true"], _ = fit_tokens_per_second(
                        args, args.rounds * args.steps, args.warmup, "--model.init_args.compile=true"
                    )
                if fit_vocab != args.vocab:
                    print(f"warning: the fit runs' tokenizer has {fit_vocab} tokens, not {args.vocab}")
            peaks.append(matmul_flops(device, dtype))
            for name in steps if round_ % 2 == 0 else reversed(steps):
                wall, cpu_share = time_steps(steps[name], args.steps, device)
                rates[name].append(args.batch * args.context * args.steps / wall)
                cpu_shares.append(cpu_share)
    print_table(args, device, transformers_version, lm, rates, fit_rates, max(peaks), cpu_shares)
    return 0


def print_table(
    args: argparse.Namespace,
    device: torch.device,
    transformers_version: str,
    lm: LanguageModel,
    rates: dict[str, list[float]],
    fit_rates: dict[str, float],
    peak: float,
    cpu_shares: list[float],
) -> None:
    threads = torch.get_num_threads()
    flops_per_token, n_params = lm.model.flops_per_token(), sum(p.numel() for p in lm.model.parameters())
    print(
        f"device {device}, precision {args.precision}, torch {torch.__version__}, "
        f"transformers {transformers_version}, {threads} CPU threads"
    )
    print(
        f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context}, "
        f"vocab {args.vocab}, {n_params:,} parameters, no dropout unless named; batch {args.batch}; "
        f"{args.rounds} rounds of {args.steps} steps per row"
    )
    print(f"model FLOPs per token {flops_per_token:,}; matmul peak {peak / 1e9:,.1f} GFLOP/s ({args.precision})")
    if device.type == "cpu" and statistics.median(cpu_shares) < 0.85:
        print(
            f"warning: other processes were using the CPU (this one got {statistics.median(cpu_shares):.0%} "
            "of its threads' time): the figures below understate every row and their ratios are unreliable"
        )

    def ratio(values: list[float] | float, reference: str) -> str:
        """Median over rounds of the per-round ratio; for a fit row (one figure), over the reference's median."""
        if isinstance(values, float):
            return f"{values / statistics.median(rates[reference]):.2f}x"
        return f"{statistics.median(mine / theirs for mine, theirs in zip(values, rates[reference])):.2f}x"

    references = (REFERENCE, MODEL_STEP, PLAIN_LOOP)
    print(f"\n{'row':<40} {'tokens/s':>10} {'MFU':>7} " + " ".join(f"{'vs ' + name:>22}" for name in references))
    for name, values in [*rates.items(), *fit_rates.items()]:
        tokens_per_s = values if isinstance(values, float) else statistics.median(values)
        row = f"{name:<40} {tokens_per_s:>10,.0f} {tokens_per_s * flops_per_token / peak:>7.1%} "
        print(row + " ".join(f"{ratio(values, reference):>22}" for reference in references))


if __name__ == "__main__":
    sys.exit(main())
