"""Training losses, as functions the LightningModules and the benchmarks share."""

from torch import Tensor, nn

from xlab.data.tokenizer import PAD_ID


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats, computed in float32) of ``logits`` (batch, time, vocab) against ``targets``
    (batch, time): every position of a packed language-model batch counts."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def seq2seq_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean label-smoothed cross-entropy (float32) over the real target tokens; padding counts for nothing."""
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing
    )
