"""det.data.samplers: deterministic, sharded, grouped, resumable training batches; test shards."""
from __future__ import annotations

import numpy as np
import pytest

from det.data.samplers import IterationBatchSampler, aspect_ratio_groups
from mabn.utils.errors import UserError


def _batches(**kwargs) -> list:
    options = dict(num_samples=23, batch_size=2, max_iter=30)
    options.update(kwargs)
    return list(IterationBatchSampler(**options))


def test_deterministic_from_the_seed():
    first = _batches(seed=5)
    assert first == _batches(seed=5) and first != _batches(seed=6)
    assert len(first) == 30 and all(len(batch) == 2 for batch in first)


def test_each_pass_visits_every_image_once():
    indices = [i for batch in _batches(num_samples=20, max_iter=10) for i, _ in batch]
    assert sorted(indices) == list(range(20))


def test_ranks_get_disjoint_shards_within_a_pass():
    shards = [[i for batch in _batches(num_samples=24, batch_size=2, max_iter=4, rank=r, world_size=3)
               for i, _ in batch] for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(24))  # one pass: 3 ranks x 4 iterations x 2 images


def test_augmentation_seeds_are_distinct_and_name_rank_and_iteration():
    batches = _batches(rank=1, world_size=2, seed=9)
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    assert batches[4][1][1] == (9, 1, 4, 1)


def test_resume_yields_the_tail_exactly():
    groups = aspect_ratio_groups(np.random.default_rng(0).uniform(0.5, 2.0, 23))
    full = _batches(group_ids=groups, rank=1, world_size=2, seed=3)
    resumed = IterationBatchSampler(23, 2, 30, start_iter=17, group_ids=groups, rank=1, world_size=2, seed=3)
    assert len(resumed) == 13 and list(resumed) == full[17:]
    assert list(IterationBatchSampler(23, 2, 30, start_iter=30)) == []


def test_batches_never_mix_aspect_groups():
    ratios = np.random.default_rng(1).uniform(0.5, 2.0, 40)
    groups = aspect_ratio_groups(ratios)
    assert set(groups.tolist()) == {0, 1} and groups[np.argmin(ratios)] == 0 and groups[np.argmax(ratios)] == 1
    batches = _batches(num_samples=40, batch_size=4, max_iter=50, group_ids=groups)
    assert len(batches) == 50
    assert all(len({int(groups[i]) for i, _ in batch}) == 1 for batch in batches)


def test_bad_arguments():
    with pytest.raises(UserError, match="fewer than the 4 processes"):
        IterationBatchSampler(3, 1, 10, world_size=4)
    with pytest.raises(ValueError, match="start_iter"):
        IterationBatchSampler(10, 1, 10, start_iter=11)
    with pytest.raises(ValueError, match="group ids"):
        IterationBatchSampler(10, 1, 10, group_ids=[0, 1])
