"""Token statistics, bits per byte and epoch metrics that must be ratios of sums, not means of ratios."""

import math

import pytest
import torch
import torch.nn.functional as F

from xlab.models.metrics import LMMetrics, bits_per_byte, token_statistics

VOCAB = 11


def batch(rows, length, counted, seed, ignore_index=-100, hint=0.0):
    """Random logits/targets where only the first ``counted`` targets of each row are scored.

    ``hint`` is added to the target's logit, so batches can differ in loss and accuracy.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, VOCAB, generator=generator) * 2
    targets = torch.randint(0, VOCAB, (rows, length), generator=generator)
    logits.scatter_add_(-1, targets[..., None], torch.full((rows, length, 1), hint))
    targets[:, counted:] = ignore_index
    return logits, targets


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_token_statistics_match_cross_entropy(ignore_index):
    logits, targets = batch(3, 7, counted=5, seed=0, ignore_index=ignore_index)
    if ignore_index == 0:
        targets[targets == 0] = 1  # token 0 is padding here; keep real targets off it
        targets[:, 5:] = 0
        logits[:, 5:, 0] += 10.0  # predicting the padding token at padding positions is not "correct"
    stats = token_statistics(logits, targets, ignore_index=ignore_index)
    expected_sum = F.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    expected_mean = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=ignore_index)
    torch.testing.assert_close(stats["loss_sum"], expected_sum)
    assert stats["tokens"].item() == 15
    torch.testing.assert_close(stats["loss_sum"] / stats["tokens"], expected_mean)
    correct = sum(int(logits[b, t].argmax() == targets[b, t]) for b in range(3) for t in range(5))
    assert stats["correct"].item() == correct


def test_token_statistics_by_hand():
    """Two counted targets with known probabilities, one ignored."""
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[0, 2, -100]])
    stats = token_statistics(logits, targets)
    assert stats["loss_sum"].item() == pytest.approx(-math.log(0.5) - math.log(0.1), rel=1e-6)
    assert stats["tokens"].item() == 2
    assert stats["correct"].item() == 1


def test_token_statistics_in_float32_for_half_logits():
    logits, targets = batch(2, 6, counted=6, seed=1)
    half = logits.to(torch.bfloat16)
    stats = token_statistics(half, targets)
    assert stats["loss_sum"].dtype == torch.float32
    expected = F.cross_entropy(half.float().reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(stats["loss_sum"], expected)


def test_token_statistics_gradient_flows_through_loss_only():
    logits, targets = batch(2, 4, counted=3, seed=2)
    logits.requires_grad_(True)
    stats = token_statistics(logits, targets)
    stats["loss_sum"].backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad[:, 3:]) == 0  # ignored targets get no gradient
    assert not stats["correct"].requires_grad


def test_bits_per_byte_arithmetic():
    # 12 * ln 2 nats = 12 bits over 4 bytes = 3 bits per byte
    assert bits_per_byte(torch.tensor(12 * math.log(2)), torch.tensor(4)).item() == pytest.approx(3.0)
    assert bits_per_byte(torch.tensor(5.0), torch.tensor(10)).item() == pytest.approx(5.0 / math.log(2) / 10)
    # per-sequence (vector) use, as in predict_step
    values = bits_per_byte(torch.tensor([math.log(2), 4 * math.log(2)]), torch.tensor([2, 8]))
    torch.testing.assert_close(values, torch.tensor([0.5, 0.5]))
    # no bytes (and so no loss): zero, not NaN
    assert bits_per_byte(torch.tensor(0.0), torch.tensor(0)).item() == 0.0


def epoch_batches():
    """Three batches with very unequal token counts (2, 40, 9 targets) and byte counts."""
    return [
        (batch(1, 4, counted=2, seed=10, hint=6.0), torch.tensor(3)),
        (batch(5, 8, counted=8, seed=11), torch.tensor(170)),
        (batch(3, 5, counted=3, seed=12, hint=2.0), torch.tensor(20)),
    ]


def test_lm_metrics_are_ratios_of_sums():
    metrics = LMMetrics()
    loss_sum = correct = tokens = num_bytes = 0.0
    per_batch_loss, per_batch_accuracy, per_batch_bpb = [], [], []
    for (logits, targets), nbytes in epoch_batches():
        stats = token_statistics(logits, targets)
        metrics.update(stats, nbytes)
        loss_sum += stats["loss_sum"].item()
        correct += stats["correct"].item()
        tokens += stats["tokens"].item()
        num_bytes += nbytes.item()
        per_batch_loss.append(stats["loss_sum"].item() / stats["tokens"].item())
        per_batch_accuracy.append(stats["correct"].item() / stats["tokens"].item())
        per_batch_bpb.append(stats["loss_sum"].item() / math.log(2) / nbytes.item())
    values = metrics.compute()

    expected = {
        "loss": loss_sum / tokens,
        "accuracy": correct / tokens,
        "perplexity": math.exp(loss_sum / tokens),
        "bits_per_byte": loss_sum / math.log(2) / num_bytes,
    }
    for name, value in expected.items():
        assert values[name].item() == pytest.approx(value, rel=1e-5), name

    # The batches are unequal enough that a mean of per-batch ratios would be visibly different.
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert abs(mean(per_batch_loss) - expected["loss"]) > 0.05
    assert abs(mean(per_batch_accuracy) - expected["accuracy"]) > 0.05
    assert abs(mean(per_batch_bpb) - expected["bits_per_byte"]) > 0.05


def test_lm_metrics_reset_starts_a_new_epoch():
    metrics = LMMetrics()
    for (logits, targets), nbytes in epoch_batches():
        metrics.update(token_statistics(logits, targets), nbytes)
    metrics.reset()
    (logits, targets), nbytes = epoch_batches()[1]
    stats = token_statistics(logits, targets)
    metrics.update(stats, nbytes)
    values = metrics.compute()
    assert values["loss"].item() == pytest.approx((stats["loss_sum"] / stats["tokens"]).item(), rel=1e-6)
    assert values["bits_per_byte"].item() == pytest.approx(
        stats["loss_sum"].item() / math.log(2) / nbytes.item(), rel=1e-6
    )


def test_lm_metrics_batch_without_counted_targets_changes_nothing():
    reference, metrics = LMMetrics(), LMMetrics()
    (logits, targets), nbytes = epoch_batches()[0]
    stats = token_statistics(logits, targets)
    reference.update(stats, nbytes)
    metrics.update(stats, nbytes)
    empty_logits, empty_targets = batch(2, 4, counted=0, seed=13)
    metrics.update(token_statistics(empty_logits, empty_targets), torch.tensor(0))
    expected, values = reference.compute(), metrics.compute()
    for name in ("loss", "accuracy", "perplexity", "bits_per_byte"):
        assert values[name].item() == pytest.approx(expected[name].item(), rel=1e-6), name
