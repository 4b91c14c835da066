"""det.data.build: loaders from plain config values, global batch sizes, sharding, resume, workers."""
from __future__ import annotations

import pickle

import pytest
import torch

from det_helpers import run_script

import mabn.utils.data
from det.data.build import (TestLoaderOptions, TrainLoaderOptions, batch_size_per_process, build_test_loaders,
                            build_train_loader)
from det.data.shapes import ensure_shapes_dataset
from mabn.utils.errors import UserError

TRAIN = dict(flip_prob=0.5, num_workers=0, aspect_grouping=True, seed=1)


def _quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small generated dataset, registered under two names relative to its root."""
    shapes = ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, categories=3, train_images=10,
                                   val_images=5, image_size=64, log=_quiet)
    catalog = {"tiny_train": {"img_dir": "train", "ann_file": "annotations/instances_train.json"},
               "tiny_val": {"img_dir": "val", "ann_file": "annotations/instances_val.json"}}
    return str(shapes.root), catalog


def _train_loader(tiny, **kwargs):
    root, catalog = tiny
    options = dict(TRAIN, ims_per_batch=4, world_size=2, rank=0, max_iter=6, start_iter=0)
    options.update(kwargs)
    return build_train_loader(TrainLoaderOptions(["tiny_train"], root, **options), catalog=catalog, log=_quiet)


def test_batch_sizes_are_global():
    assert batch_size_per_process(16, 8, "SOLVER.IMS_PER_BATCH") == 2
    with pytest.raises(UserError, match=r"SOLVER.IMS_PER_BATCH 6 .* multiple of the number of processes \(4\); "
                                        r"pass e.g. SOLVER.IMS_PER_BATCH 4"):
        batch_size_per_process(6, 4, "SOLVER.IMS_PER_BATCH")
    with pytest.raises(UserError, match="TEST.IMS_PER_BATCH 1"):
        batch_size_per_process(1, 2, "TEST.IMS_PER_BATCH")


def test_batch_size_is_checked_before_reading_data(tmp_path):
    with pytest.raises(UserError, match="SOLVER.IMS_PER_BATCH 3"):
        build_train_loader(TrainLoaderOptions(["nowhere"], str(tmp_path), ims_per_batch=3, world_size=2, rank=0,
                                              max_iter=1, **TRAIN), catalog={})
    with pytest.raises(UserError, match="TEST.IMS_PER_BATCH 3"):
        build_test_loaders(TestLoaderOptions(["nowhere"], str(tmp_path), 3, 2, 0, 0), catalog={})
    with pytest.raises(UserError, match="unknown dataset 'nowhere'"):
        build_test_loaders(TestLoaderOptions(["nowhere"], str(tmp_path), 2, 2, 0, 0), catalog={"elsewhere": {}})


def test_train_loader_yields_model_inputs(tiny):
    batches = list(_train_loader(tiny))
    assert len(batches) == 6
    for images, targets, indices in batches:
        assert len(images) == len(targets) == len(indices) == 2  # 4 global over 2 processes
        for image, target in zip(images, targets):
            assert image.dtype == torch.float32 and image.shape[0] == 3 and 0.0 <= float(image.min())
            assert float(image.max()) <= 1.0 and max(image.shape[1:]) <= 64  # RGB 0..1 at the original size
            assert target["masks"].shape[1:] == image.shape[1:] and len(target["labels"]) >= 1
            assert set(target["labels"].tolist()) <= {1, 2, 3}
            boxes = target["boxes"]
            assert (boxes[:, 2:] > boxes[:, :2]).all() and float(boxes[:, 2].max()) <= image.shape[2]


def test_train_loader_is_deterministic_and_resumes(tiny):
    def flat(loader):
        return [(indices, [image.sum().item() for image in images]) for images, _, indices in loader]

    full = flat(_train_loader(tiny))
    assert full == flat(_train_loader(tiny))
    assert flat(_train_loader(tiny, start_iter=4)) == full[4:]
    other_rank = flat(_train_loader(tiny, rank=1, max_iter=2))
    assert not set(sum((i for i, _ in other_rank), [])) & set(sum((i for i, _ in full[:2]), []))


def test_several_training_datasets_concatenate(tiny, tmp_path):
    root, catalog = tiny
    loader = build_train_loader(TrainLoaderOptions(["tiny_train", "tiny_val"], root, ims_per_batch=2, world_size=1,
                                                   rank=0, max_iter=8, **TRAIN), catalog=catalog, log=_quiet)
    assert len(loader.dataset) == 15 and loader.dataset.category_to_contiguous == {1: 1, 3: 2, 5: 3}
    assert sorted({i for _, _, indices in loader for i in indices}) == list(range(15))
    other = ensure_shapes_dataset(tmp_path, seed=1, categories=2, train_images=2, val_images=1, image_size=64,
                                  log=_quiet)
    two = {"two_categories": {"img_dir": str(other.img_dir("train")), "ann_file": str(other.ann_file("train"))}}
    with pytest.raises(UserError, match="different categories"):
        build_train_loader(TrainLoaderOptions(["tiny_train", "two_categories"], root, ims_per_batch=2, world_size=1,
                                              rank=0, max_iter=1, **TRAIN), catalog={**catalog, **two}, log=_quiet)


def test_test_loaders_shard_at_original_size(tiny):
    root, catalog = tiny
    seen = []
    for rank in range(2):
        [(name, dataset, loader)] = build_test_loaders(TestLoaderOptions(["tiny_val"], root, 4, 2, rank, 0),
                                                       catalog=catalog, log=_quiet)
        assert name == "tiny_val" and len(dataset) == 5
        for images, _, indices in loader:
            assert len(images) <= 2
            for image, index in zip(images, indices):
                assert tuple(image.shape[1:]) == dataset.image_size(index)
            seen.extend(indices)
    assert sorted(seen) == list(range(5))


def test_published_shapes_names_generate_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MABN_CACHE", str(tmp_path))
    messages = []
    [(_, dataset, loader)] = build_test_loaders(TestLoaderOptions(["shapes_val"], "unused-root", 8, 1, 0, 0),
                                                log=messages.append)
    assert len(messages) == 1 and str(tmp_path) in messages[0] and len(dataset) >= 50
    assert dataset.img_dir.startswith(str(tmp_path)) and len(dataset.category_to_contiguous) == 3
    images, targets, _ = next(iter(loader))
    assert len(images) == 8 and "masks" in targets[0]


def test_workers_use_forkserver_and_match_the_main_process(tiny, tmp_path):
    loader = _train_loader(tiny, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    # The shared worker policy (its SIGTERM behaviour: tests/mabn/utils/test_utils_data.py).
    assert loader.worker_init_fn.func is mabn.utils.data._worker_init
    root, catalog = tiny
    [(_, _, test_loader)] = build_test_loaders(TestLoaderOptions(["tiny_val"], root, 2, 1, 0, 1), catalog=catalog,
                                               log=_quiet)
    assert test_loader.worker_init_fn.func is mabn.utils.data._worker_init and not test_loader.persistent_workers
    assert len(pickle.loads(pickle.dumps(loader.dataset))) == len(loader.dataset)
    script = f"""
        from det.data.build import TrainLoaderOptions, build_train_loader

        def batches(workers):
            options = TrainLoaderOptions(["tiny_train"], {root!r}, 0.5, 2, 1, 0, workers, True, 5, seed=1)
            loader = build_train_loader(options, catalog={catalog!r})
            return [(indices, [float(image.sum()) for image in images]) for images, _, indices in loader]

        if __name__ == "__main__":
            assert batches(1) == batches(0)
            print("same batches")
    """
    assert "same batches" in run_script(tmp_path, "workers.py", script, timeout=240)
