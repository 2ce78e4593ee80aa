"""Token-level metrics, summed exactly over an epoch and across processes, and corpus translation scores."""

import math
from collections.abc import Sequence

import torch
from sacrebleu.metrics import BLEU, CHRF
from torch import Tensor, nn
from torchmetrics import MeanMetric


def token_statistics(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> dict[str, Tensor]:
    """Summed cross-entropy (nats, computed in float32), correct predictions and counted targets."""
    flat_targets = targets.reshape(-1)
    loss_sum = nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), flat_targets, ignore_index=ignore_index, reduction="sum"
    )
    counted = flat_targets != ignore_index
    correct = ((logits.detach().argmax(-1).reshape(-1) == flat_targets) & counted).sum()
    return {"loss_sum": loss_sum, "correct": correct, "tokens": counted.sum()}


def token_accuracy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The share of counted targets that are the most likely token."""
    counted = targets != ignore_index
    correct = (logits.detach().argmax(-1) == targets) & counted
    return correct.sum() / counted.sum().clamp(min=1)


def bits_per_byte(loss_sum: Tensor, num_bytes: Tensor) -> Tensor:
    """Total nats over the bytes the targets stand for, in bits: comparable across tokenizers."""
    return loss_sum / math.log(2) / num_bytes.clamp(min=1)


class LMMetrics(nn.Module):
    """Loss, accuracy, perplexity and bits per byte, each a ratio of sums over the whole epoch."""

    def __init__(self):
        super().__init__()
        self.loss = MeanMetric()
        self.accuracy = MeanMetric()
        self.bits_per_byte = MeanMetric()

    def update(self, stats: dict[str, Tensor], num_bytes: Tensor) -> None:
        tokens = stats["tokens"].float()
        per_token = tokens.clamp(min=1)
        self.loss.update(stats["loss_sum"].detach() / per_token, tokens)
        self.accuracy.update(stats["correct"] / per_token, tokens)
        self.bits_per_byte.update(bits_per_byte(stats["loss_sum"].detach(), num_bytes), num_bytes.float())

    def compute(self) -> dict[str, Tensor]:
        loss = self.loss.compute()
        return {
            "loss": loss,
            "accuracy": self.accuracy.compute(),
            "perplexity": torch.exp(loss),
            "bits_per_byte": self.bits_per_byte.compute(),
        }

    def reset(self) -> None:
        for metric in (self.loss, self.accuracy, self.bits_per_byte):
            metric.reset()


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact-match rate (0 to 1) and sacrebleu's corpus BLEU and chrF (0 to 100), one reference per sentence."""
    if not hypotheses:
        return {"exact_match": 0.0, "bleu": 0.0, "chrf": 0.0}
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / len(hypotheses)
    return {
        "exact_match": exact,
        "bleu": BLEU().corpus_score(list(hypotheses), [list(references)]).score,
        "chrf": CHRF().corpus_score(list(hypotheses), [list(references)]).score,
    }
