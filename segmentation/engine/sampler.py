"""Samplers whose results do not depend on the number of processes.

``GlobalBatchSampler`` draws one permutation per epoch (from ``seed`` and the epoch only) and
cuts it into global batches of ``batch_size_per_rank * world_size`` samples; each rank takes its
slice of every global batch. The global batch sequence is therefore the same for 1, 2 or 4
processes with the same total batch, and a run can resume mid-epoch at any batch.

``EvalShardSampler`` splits the evaluation set into contiguous shards without padding, so the
all-reduced confusion matrix counts every image exactly once (the reference's
``DistributedSampler`` counted some twice).
"""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> List[int]:
    """The permutation of ``range(num_samples)`` used in ``epoch`` (same on every rank)."""
    generator = torch.Generator()
    # Any fixed injective-enough mix of (seed, epoch) will do; it only has to be the same everywhere.
    generator.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_samples, generator=generator).tolist()


class GlobalBatchSampler(Sampler[List[int]]):
    """Batch sampler yielding this rank's share of each global batch.

    Global batch k of an epoch is ``perm[k*G:(k+1)*G]`` with ``G = batch_size_per_rank *
    world_size``; rank r gets ``[r*b:(r+1)*b]`` of it. With ``drop_last`` the incomplete last
    global batch is dropped; without it, the last batch is completed with samples from the start of
    the permutation so every rank gets a full batch (ranks must stay in step).
    """

    def __init__(self, num_samples: int, batch_size_per_rank: int, rank: int, world_size: int,
                 seed: int, drop_last: bool = True) -> None:
        _check_rank(rank, world_size)
        if batch_size_per_rank < 1:
            raise ValueError(f"batch_size_per_rank must be positive, got {batch_size_per_rank}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.batch_size_per_rank = batch_size_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._start_batch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_rank * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def set_start_batch(self, batch: int) -> None:
        """Make the next iteration start at global batch ``batch`` (resume); later ones start at 0."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} outside 0..{len(self)}")
        self._start_batch = batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    def __iter__(self) -> Iterator[List[int]]:
        start, self._start_batch = self._start_batch, 0
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        size = self.global_batch_size
        needed = len(self) * size
        while order and len(order) < needed:  # only without drop_last: wrap around
            order = order + order[: needed - len(order)]
        first = self.rank * self.batch_size_per_rank
        for batch in range(start, len(self)):
            global_batch = order[batch * size:(batch + 1) * size]
            yield global_batch[first:first + self.batch_size_per_rank]


class EvalShardSampler(Sampler[int]):
    """Contiguous shard of ``range(num_samples)`` for one rank; the shards cover each index once.

    The first ``num_samples % world_size`` ranks get one sample more than the others.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        _check_rank(rank, world_size)
        base, extra = divmod(num_samples, world_size)
        self.start = rank * base + min(rank, extra)
        self.stop = self.start + base + (1 if rank < extra else 0)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))
