"""cls.data: per-rank sampling without replacement, exact evaluation shards, image reading errors."""
from __future__ import annotations

import pytest

from cls.data import ShardSampler, TrainBatchSampler, load_bgr, open_image_folder
from mabn.utils.errors import CorruptImageError, UserError


def _epoch(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [item for batch in sampler for item in batch]


def test_no_sample_twice_within_a_pass_across_ranks():
    n, world, batch, iters = 103, 3, 4, 8  # 96 = 3 ranks x 8 x 4 of the 102 usable images
    streams = [[i for i, _ in _epoch(TrainBatchSampler(n, batch, iters, rank, world, seed=1), 1)] for rank in range(world)]
    everything = [i for stream in streams for i in stream]
    assert len(everything) == len(set(everything)) == world * batch * iters


def test_reshuffled_each_epoch_and_deterministic_from_seed():
    sampler = TrainBatchSampler(50, 5, 10, seed=4)
    first, second = _epoch(sampler, 1), _epoch(sampler, 2)
    assert sorted(i for i, _ in first) == list(range(50)) and [i for i, _ in first] != [i for i, _ in second]
    assert first == _epoch(TrainBatchSampler(50, 5, 10, seed=4), 1)
    assert [i for i, _ in first] != [i for i, _ in _epoch(TrainBatchSampler(50, 5, 10, seed=5), 1)]


def test_epoch_longer_than_the_dataset_takes_more_passes():
    indices = [i for i, _ in _epoch(TrainBatchSampler(10, 4, 6), 1)]  # 24 samples from 10 images
    assert len(indices) == 24 and sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))


def test_resume_inside_an_epoch_continues_the_same_stream():
    sampler = TrainBatchSampler(40, 4, 7, rank=1, world_size=2, seed=9)
    full = _epoch(sampler, 3)
    assert _epoch(sampler, 3, start=4) == full[16:]
    seeds = [seed for _, seed in full]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed


def test_shards_cover_the_validation_set_exactly_once():
    n, world = 11, 4
    shards = [list(ShardSampler(n, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(ShardSampler(n, rank, world)) for rank in range(world)] == [3, 3, 3, 2]


def test_tiny_dataset_for_the_world_size():
    with pytest.raises(UserError, match="fewer than the 4 processes"):
        TrainBatchSampler(3, 1, 1, world_size=4)


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_bgr(str(bad))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty.jpg"):
        load_bgr(str(empty))
    with pytest.raises(CorruptImageError, match="nothere.png"):
        load_bgr(str(tmp_path / "nothere.png"))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        open_image_folder(str(tmp_path / "none"), "--train_dir")
    with pytest.raises(UserError, match="no images found"):
        open_image_folder(str(tmp_path), "--train_dir")
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        open_image_folder(str(tmp_path), "--val_dir")
