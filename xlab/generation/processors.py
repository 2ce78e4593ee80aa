"""Logit processing, the shared part of every strategy: repetition penalty, temperature, top-k, top-p, min-p."""

import math

import torch
from torch import Tensor

from xlab.generation.config import GenerationConfig


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty as in Hugging Face: seen tokens' positive logits divided, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf every token that top-k, then top-p (nucleus), then min-p remove; at least one survives."""
    removed = torch.zeros_like(logits, dtype=torch.bool)
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        removed |= logits < kth
    logits = logits.masked_fill(removed, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # mass before this token already reaches top_p
        removed |= drop.scatter(-1, order, drop)
        logits = logits.masked_fill(removed, -math.inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        removed |= probs < min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(removed, -math.inf)
    return logits


def next_token_logits(logits: Tensor, seen: Tensor, config: GenerationConfig) -> Tensor:
    """Repetition penalty, temperature and filtering, in Hugging Face's order."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.sampling:
        logits = filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p)
    return logits
