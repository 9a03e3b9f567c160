"""Which pairs each optimizer step sees: a resumable stream of index batches.

Epoch ``e`` visits the pairs in the order ``DistributedSampler(seed=seed).set_epoch(e)`` gives
this process (every process its own shard), and epochs are chained into one endless stream that
batches may straddle. The position in the stream follows from the number of batches taken, so
a resumed run continues with exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from typing import Iterator

from torch.utils.data import DistributedSampler


class _Indices:
    """Minimal sized dataset stand-in: DistributedSampler only needs len()."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class BatchStream:
    """Endless batches of dataset indices for one process, starting after ``start_batch`` batches.

    Usable as a DataLoader ``batch_sampler``.
    """

    def __init__(self, num_items: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, start_batch: int = 0):
        if num_items < 1:
            raise ValueError("no training items")
        self.sampler = DistributedSampler(_Indices(num_items), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.start_batch = start_batch

    @property
    def per_epoch(self) -> int:
        """Items this process sees per epoch."""
        return self.sampler.num_samples

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start_batch * self.batch_size
        epoch, offset = divmod(pos, self.per_epoch)
        batch: list[int] = []
        while True:
            self.sampler.set_epoch(epoch)
            for idx in list(self.sampler)[offset:]:
                batch.append(idx)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, offset = epoch + 1, 0


def steps_for_epochs(epochs: int, per_epoch: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over one process's shard."""
    return max(1, math.ceil(epochs * per_epoch / (batch_size * grad_accum)))
