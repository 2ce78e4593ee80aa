"""Packed token sequences and a data loader that resumes mid-epoch exactly where a checkpoint left it."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class PackedSequences(Dataset):
    """Non-overlapping windows of ``context_length`` + 1 tokens over one long token array.

    Each item is the model input (first ``context_length`` tokens), the targets (the same
    shifted by one) and the number of text bytes the targets stand for.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, token_bytes: np.ndarray):
        self.tokens = tokens
        self.context_length = context_length
        self.token_bytes = token_bytes

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context_length)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.context_length
        window = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))
        return {
            "input": window[:-1],
            "target": window[1:],
            "target_bytes": torch.tensor(self.token_bytes[window[1:].numpy()].sum()),
        }


class ResumableSampler(DistributedSampler):
    """A shuffling (and, across ranks, sharding) sampler whose first pass can skip what was already seen.

    Being a DistributedSampler, Lightning leaves it in place and sets its epoch.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0
        return iter(indices)


class ShardSampler(DistributedSampler):
    """Each rank takes every ``num_replicas``-th item in order, with no padding, so that metrics
    summed over the ranks cover the split exactly once (DistributedSampler repeats items to even out ranks).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ResumableLoader(DataLoader):
    """A DataLoader whose ``state_dict`` records the epoch and the batches handed out in it.

    Lightning stores that state in every checkpoint and gives it back before iterating
    on resume, so training continues with the very next batch of the same permutation.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_seen = 0

    def __iter__(self) -> Iterator[Any]:
        self.batches_seen = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self.batches_seen += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batches_seen"] >= len(self):
            self.sampler.set_epoch(state["epoch"] + 1)
            self.sampler.skip = 0
        else:
            self.sampler.set_epoch(state["epoch"])
            self.sampler.skip = state["batches_seen"] * self.batch_size
