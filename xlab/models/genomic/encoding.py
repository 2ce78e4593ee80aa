"""Coordinate encodings: an index in ``range(n)`` as the input features of a g-net."""

import math
from typing import Literal

import torch
from torch import Tensor

Encoding = Literal["binary", "gray", "fourier"]


def bits_for(n: int) -> int:
    """Binary digits that tell ``n`` indices apart (at least one)."""
    return max(1, math.ceil(math.log2(n)))


def width(n: int, encoding: Encoding) -> int:
    """Features per index of ``range(n)``."""
    return 2 * bits_for(n) - 1 if encoding == "fourier" else bits_for(n)


def encode(n: int, encoding: Encoding) -> Tensor:
    """Features (n, width(n, encoding)) of the indices ``0..n-1``.

    ``binary``: the bits as -1/+1, least significant first (torchGB's code, centred); ``gray``: the bits of the
    reflected Gray code, where neighbouring indices differ in one feature; ``fourier``: cos and sin of the index at
    periods 2, 4, ..., 2**bits (no sin at period 2: it is zero), a smooth code whose cos at period 2 is the
    lowest binary bit.
    """
    index = torch.arange(n)
    bits = bits_for(n)
    if encoding == "fourier":
        angles = 2 * math.pi * index[:, None].double() / 2.0 ** torch.arange(1, bits + 1)
        return torch.cat((angles.cos(), angles[:, 1:].sin()), dim=1).float()
    if encoding == "gray":
        index = index ^ (index >> 1)
    digits = (index[:, None] >> torch.arange(bits)) & 1
    return (2 * digits - 1).float()
