"""Sharding and batching, exactly as DESIGN.md states.

* Shard D_k is the contiguous block ``[⌊kN/K⌋, ⌊(k+1)N/K⌋)``.
* The global batch B is split over the K workers like ``numpy.array_split``: worker k takes
  ``b_k = ⌊B/K⌋ + (1 if k < B mod K else 0)`` rows (B/K each when K divides B).
* Every worker runs the same number of steps per epoch, ``S = max_j ⌈|D_j| / b_j⌉``, so
  every shard is covered each epoch; step t of an epoch takes positions ``[t·b_k, (t+1)·b_k)``
  of the shard (fewer, or none, at the end of a short shard). The server weights each
  gradient by its row count, so a step's gradient is the mean over all rows of that step.
* Without shuffling the positions are the shard's own order. With shuffling, the shard is
  permuted each epoch by ``torch.randperm`` with a generator seeded by :func:`shuffle_seed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of worker ``rank``'s permutation in ``epoch``."""
    return (seed * 1_000_003 + epoch * 8_191 + rank) % (2**63)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed worker ``rank`` sets before computing ``step`` (dropout and the like), so the
    step's random state follows from the step alone, as its batch does, and survives a restart."""
    return (seed * 1_000_003 + rank * 999_983 + step * 8_191 + 17) % (2**63)


@dataclass(frozen=True)
class ShardPlan:
    """Which rows worker ``rank`` of ``world`` uses at each step."""

    n: int
    world: int
    batch: int
    rank: int

    def bounds(self, k: int) -> tuple[int, int]:
        """Rows of shard k."""
        return k * self.n // self.world, (k + 1) * self.n // self.world

    def local_batch(self, k: int) -> int:
        """b_k, worker k's share of the global batch."""
        return self.batch // self.world + (1 if k < self.batch % self.world else 0)

    def uneven(self) -> str | None:
        """What the split of an indivisible global batch is (None when K divides B), for a warning."""
        extra = self.batch % self.world
        if not extra:
            return None
        big, small = self.local_batch(0), self.local_batch(self.world - 1)
        first = "rank 0" if extra == 1 else f"ranks 0-{extra - 1}"
        rest = f"rank {extra}" if extra == self.world - 1 else f"ranks {extra}-{self.world - 1}"
        verb = "takes" if extra == 1 else "take"
        return (f"--batch-size {self.batch} is not a multiple of the {self.world} workers: {first} {verb} {big} "
                f"rows per step, {rest} {small} (each gradient is weighted by its rows, so a step is still the "
                f"mean over {self.batch} rows; a multiple of {self.world} gives equal shares)")

    @property
    def steps_per_epoch(self) -> int:
        """S, the same for every worker."""
        return max(math.ceil((hi - lo) / self.local_batch(k)) for k in range(self.world)
                   for lo, hi in [self.bounds(k)])

    def count(self, step: int, k: int) -> int:
        """How many rows rank ``k`` computes at global ``step``."""
        t = step % self.steps_per_epoch
        lo, hi = self.bounds(k)
        b = self.local_batch(k)
        return max(0, min((t + 1) * b, hi - lo) - min(t * b, hi - lo))

    def total(self, step: int) -> int:
        """Rows of global ``step`` over every rank (the weights' denominator)."""
        return sum(self.count(step, k) for k in range(self.world))

    def rows(self, step: int, shuffle: bool, seed: int) -> torch.Tensor:
        """Dataset row indices of this worker's batch at global ``step`` (may be empty)."""
        epoch, t = divmod(step, self.steps_per_epoch)
        lo, hi = self.bounds(self.rank)
        b = self.local_batch(self.rank)
        start, stop = min(t * b, hi - lo), min((t + 1) * b, hi - lo)
        if shuffle:
            gen = torch.Generator().manual_seed(shuffle_seed(seed, epoch, self.rank))
            return lo + torch.randperm(hi - lo, generator=gen)[start:stop]
        return torch.arange(lo + start, lo + stop)


def fetch(dataset: Dataset, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate ``dataset[rows]`` into (x, y) (a fast path for TensorDataset)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[0][rows], dataset.tensors[1][rows]
        return x, y
    x, y = default_collate([dataset[int(i)] for i in rows])
    return x, y
