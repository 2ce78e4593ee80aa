"""What the benchmarks share: model-shape options, the transformers reference, the device, CUDA-aware timing."""

import argparse
import sys

import torch

from xlab.models.config import TransformerConfig


def add_model_arguments(parser: argparse.ArgumentParser, context: int) -> None:
    """The model's shape (the default experiment's, with the given context) and the device."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=context)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def model_config(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab,
        context_length=args.context,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
    )


def transformers_and_device(device_flag: str) -> tuple[str, torch.device]:
    """The installed transformers version and the device to run on; exits with one line if either is missing."""
    try:
        import transformers
    except ImportError:
        sys.exit("error: transformers is not installed: pip install -r bench/requirements.txt")
    if device_flag == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch.cuda is not available")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    return transformers.__version__, torch.device("cuda" if use_cuda else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
