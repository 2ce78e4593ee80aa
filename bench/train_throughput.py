"""Training throughput of XLab's Decoder against Hugging Face GPT2LMHeadModel of the same architecture.

Both models get the same shape (layers, width, heads, context, vocabulary, learned positions,
pre-LayerNorm, exact GELU, biases, tied embeddings, no dropout), the same random batch, the same
loss, the same AdamW (XLab's settings, from ``LanguageModel.configure_optimizers``), the same
precision and the same torch threads. A step is forward + backward + optimizer step. After
warm-up the models take turns in rounds (A B, B A, ...); the table gives each model's median
round, its model FLOPs utilisation (MFU: ``Decoder.flops_per_token()`` x tokens/s, the same
formula for both, over the best matmul FLOP/s this machine showed in the run, in the run's
compute dtype) and the median over rounds of its speed relative to transformers in that round.
On CPU it warns when other processes took the cores: the figures are then not worth reading.

transformers, the reference, is pinned in requirements.txt (bench/requirements.txt includes it):

    pip install -r bench/requirements.txt
    python bench/train_throughput.py                       # fp32, the default experiment's model
    python bench/train_throughput.py --precision bf16      # under torch.autocast bf16 (CPU or CUDA)
    python bench/train_throughput.py --device cuda --batch 32 --steps 20
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_model_arguments, model_config, synchronize, transformers_and_device  # noqa: E402

from xlab.models.config import TransformerConfig  # noqa: E402
from xlab.models.lm import LanguageModel, OptimizerConfig  # noqa: E402
from xlab.models.losses import next_token_loss  # noqa: E402

Step = Callable[[], None]
REFERENCE = "transformers GPT-2"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, context=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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


def main() -> int:
    args = parse_args()
    transformers_version, device = transformers_and_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    torch.manual_seed(0)
    config = model_config(args)
    lm = LanguageModel(config, OptimizerConfig(decay_steps=1)).to(device)
    xlab_optimizer = lm.configure_optimizers()["optimizer"]
    hf_model = gpt2_like(config).to(device)
    n_params = sum(p.numel() for p in lm.model.parameters())
    if n_params != sum(p.numel() for p in hf_model.parameters()):
        print("error: the two models differ in parameter count: not the same architecture", file=sys.stderr)
        return 1

    tokens = torch.randint(args.vocab, (args.batch, args.context + 1), device=device)
    hf_optimizer = like_optimizer(hf_model, xlab_optimizer)
    steps = {
        "XLab": training_step(lm.model, xlab_optimizer, tokens, autocast),
        REFERENCE: training_step(lambda x: hf_model(input_ids=x).logits, hf_optimizer, tokens, autocast),
    }
    for step in steps.values():
        time_steps(step, args.warmup, device)

    rates: dict[str, list[float]] = {name: [] for name in steps}
    peaks, cpu_shares = [], []
    for round_ in range(args.rounds):
        peaks.append(matmul_flops(device, dtype))
        for name in steps if round_ % 2 == 0 else reversed(steps):
            wall, cpu_share = time_steps(steps[name], args.steps, device)
            rates[name].append(args.batch * args.context * args.steps / wall)
            cpu_shares.append(cpu_share)

    threads = torch.get_num_threads()
    flops_per_token, peak = lm.model.flops_per_token(), max(peaks)
    print(
        f"device {device}, precision {args.precision}, torch {torch.__version__}, "
        f"transformers {transformers_version}, {threads} CPU threads"
    )
    print(
        f"model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, context {args.context}, "
        f"vocab {args.vocab}, {n_params:,} parameters; batch {args.batch}; "
        f"{args.rounds} rounds of {args.steps} steps per model"
    )
    print(f"model FLOPs per token {flops_per_token:,}; matmul peak {peak / 1e9:,.1f} GFLOP/s ({args.precision})")
    if device.type == "cpu" and statistics.median(cpu_shares) < 0.85:
        print(
            f"warning: other processes were using the CPU (this one got {statistics.median(cpu_shares):.0%} "
            "of its threads' time): the figures below understate both models and their ratio is unreliable"
        )
    print(f"\n{'model':<20} {'tokens/s':>10} {'MFU':>7} {'vs transformers':>16}")
    for name, values in rates.items():
        tokens_per_s = statistics.median(values)
        ratio = statistics.median(mine / theirs for mine, theirs in zip(values, rates[REFERENCE]))
        print(f"{name:<20} {tokens_per_s:>10,.0f} {tokens_per_s * flops_per_token / peak:>7.1%} {ratio:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
