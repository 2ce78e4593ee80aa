"""What the benchmarks share: the transformers reference, the device, and timing that waits for CUDA."""

import sys

import torch


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
