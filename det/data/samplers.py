"""Iteration-based, distributed, deterministic batch sampling for training; sharding for testing.

Training (:class:`IterationBatchSampler`): the dataset is visited in passes; pass ``p`` is the
permutation drawn from ``(seed, p)``, cut to a multiple of the world size and dealt round-robin
to the ranks, so within a pass no image goes to two ranks or twice to one
(:class:`mabn.utils.data.RankPermutations`, stream ``(seed,)``, shared with ``cls``). Each rank
groups its stream by aspect ratio (landscape vs portrait, as maskrcnn-benchmark's grouping with
bins [1]): an image waits in its group's buffer and a batch is emitted when a buffer is full, so
a batch never mixes groups and padding stays small; leftovers carry over into the next pass. Batch ``i``
of a rank is a function of ``(seed, rank, world size, i)`` only: resuming at ``start_iter``
replays the integer stream (cheap) and yields from batch ``start_iter`` on. Every sample carries
its augmentation seed ``(seed, rank, i, position)``.

Testing uses :class:`mabn.utils.data.ShardSampler` (exact, uneven shards, shared with ``cls``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from mabn.utils.data import RankPermutations

__all__ = ["IterationBatchSampler", "aspect_ratio_groups"]

Sample = Tuple[int, Tuple[int, int, int, int]]


def aspect_ratio_groups(aspect_ratios: Sequence[float]) -> np.ndarray:
    """Group 0 for landscape images (height / width < 1), 1 for the others."""
    return (np.asarray(aspect_ratios, dtype=np.float64) >= 1.0).astype(np.int64)


class IterationBatchSampler(Sampler):
    """This rank's batches of ``(index, augmentation seed)`` for iterations ``start_iter`` to
    ``max_iter - 1``; see the module doc. ``group_ids`` None: no grouping."""

    def __init__(self, num_samples: int, batch_size: int, max_iter: int, start_iter: int = 0,
                 group_ids: Optional[Sequence[int]] = None, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.permutations = RankPermutations(num_samples, rank, world_size)
        if group_ids is not None and len(group_ids) != num_samples:
            raise ValueError(f"{len(group_ids)} group ids for {num_samples} samples")
        if not 0 <= start_iter <= max_iter:
            raise ValueError(f"start_iter {start_iter} outside 0..max_iter ({max_iter})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.group_ids = np.zeros(num_samples, np.int64) if group_ids is None else np.asarray(group_ids, np.int64)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def __iter__(self) -> Iterator[List[Sample]]:
        buffers: Dict[int, List[int]] = defaultdict(list)
        iteration = 0
        for index in self.permutations.stream((self.seed,)):
            if iteration >= self.max_iter:
                return
            buffer = buffers[int(self.group_ids[index])]
            buffer.append(index)
            if len(buffer) == self.batch_size:
                if iteration >= self.start_iter:
                    yield [(i, (self.seed, self.rank, iteration, p)) for p, i in enumerate(buffer)]
                buffer.clear()
                iteration += 1

    def __len__(self) -> int:
        return self.max_iter - self.start_iter
