"""The training and test data loaders, from config values gathered in options objects.

A batch is ``(images, targets, indices)``: lists of the model's image tensors (RGB in [0, 1] at
the original size: :mod:`det.data.transforms` says why), target dicts (boxes, labels, masks) and
dataset indices (:meth:`COCODataset.image_id` maps them to COCO ids).
``SOLVER.IMS_PER_BATCH`` and ``TEST.IMS_PER_BATCH`` are global: each process loads its share.
Workers (``num_workers`` > 0) start from a ``forkserver`` that has imported this module once and
follow the shared SIGTERM policy (:func:`mabn.utils.data.worker_options`); a script that builds
loaders is imported again by the server, so its entry point needs ``if __name__ == "__main__":``.
Every sample's augmentation seed comes from the sampler, so the batches are the same for any
number of workers.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from det.config.paths_catalog import DATASETS as PUBLISHED_DATASETS
from det.data.catalog import Catalog, resolve_dataset
from det.data.coco import COCODataset
from det.data.samplers import IterationBatchSampler, aspect_ratio_groups
from det.data.transforms import InferenceTransform, TrainTransform
from mabn.utils.data import ShardSampler, worker_options
from mabn.utils.errors import UserError

__all__ = ["ConcatCOCODataset", "TestLoaderOptions", "TrainLoaderOptions", "batch_size_per_process",
           "build_test_loaders", "build_train_loader", "collate"]


def batch_size_per_process(ims_per_batch: int, world_size: int, key: str) -> int:
    """``ims_per_batch / world_size``; :class:`UserError` unless it divides evenly and is positive."""
    if ims_per_batch < world_size or ims_per_batch % world_size:
        raise UserError(f"{key} {ims_per_batch} is global and must be a positive multiple of the number of "
                        f"processes ({world_size}); pass e.g. {key} {max(1, ims_per_batch // world_size) * world_size}")
    return ims_per_batch // world_size


class ConcatCOCODataset(torch.utils.data.Dataset):
    """Several training datasets with the same categories as one (DATASETS.TRAIN may list several);
    items as in :class:`COCODataset`, indices global."""

    def __init__(self, datasets: Sequence[COCODataset]):
        self.datasets = list(datasets)
        first = self.datasets[0]
        for other in self.datasets[1:]:
            if other.category_names != first.category_names:
                raise UserError(f"datasets {first.name} and {other.name} have different categories; "
                                f"train on datasets that share one category list")
        self.category_to_contiguous = first.category_to_contiguous
        self.category_names = first.category_names
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def aspect_ratios(self) -> np.ndarray:
        return np.concatenate([d.aspect_ratios() for d in self.datasets])

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        which = bisect.bisect_right(self.offsets, index) - 1
        local = index - self.offsets[which]
        image, target, _ = self.datasets[which][(local, seed) if seed is not None else local]
        return image, target, index


def collate(batch: List[tuple]) -> Tuple[list, list, list]:
    """Lists of images, targets and indices (the model pads the images into one batch itself)."""
    images, targets, indices = zip(*batch)
    return list(images), list(targets), list(indices)


def _loader_options(num_workers: int, pin_memory: bool) -> dict:
    options = {"collate_fn": collate, "pin_memory": pin_memory,
               "generator": torch.Generator()}  # keeps the global RNG out of the loader
    # The forkserver imports this module (torch, pycocotools' mask code) and OpenCV once.
    options.update(worker_options(num_workers, [__name__, "cv2"]))
    return options


def _open(name: str, root: str, catalog: Catalog, train: bool, transform: Callable,
          log: Callable[[str], None]) -> COCODataset:
    files = resolve_dataset(name, root, catalog, log)
    return COCODataset(name, files.img_dir, files.ann_file, remove_images_without_annotations=train,
                       transform=transform, layout=files.layout)


@dataclass(frozen=True)
class TrainLoaderOptions:
    """The config values behind the training loader: DATASETS.TRAIN and DATASETS.ROOT,
    INPUT.HORIZONTAL_FLIP_PROB_TRAIN, SOLVER.IMS_PER_BATCH (global), DATALOADER.NUM_WORKERS and
    ASPECT_RATIO_GROUPING, SOLVER.MAX_ITER, the iteration to resume at and SEED, with this
    process's place among ``world_size`` processes."""

    dataset_names: Sequence[str]
    root: str
    flip_prob: float
    ims_per_batch: int
    world_size: int
    rank: int
    num_workers: int
    aspect_grouping: bool
    max_iter: int
    start_iter: int = 0
    seed: int = 0
    pin_memory: bool = False


@dataclass(frozen=True)
class TestLoaderOptions:
    """The config values behind the test loaders: DATASETS.TEST and DATASETS.ROOT,
    TEST.IMS_PER_BATCH (global) and DATALOADER.NUM_WORKERS, with this process's place among
    ``world_size`` processes."""

    __test__ = False  # tells pytest that this data class is not a test class

    dataset_names: Sequence[str]
    root: str
    ims_per_batch: int
    world_size: int
    rank: int
    num_workers: int
    pin_memory: bool = False


def build_train_loader(options: TrainLoaderOptions, catalog: Optional[Catalog] = None,
                       log: Callable[[str], None] = print) -> DataLoader:
    """This process's loader of ``max_iter - start_iter`` training batches; ``catalog`` defaults to
    :data:`det.config.paths_catalog.DATASETS`."""
    per_process = batch_size_per_process(options.ims_per_batch, options.world_size, "SOLVER.IMS_PER_BATCH")
    if not options.dataset_names:
        raise UserError("DATASETS.TRAIN is empty; name at least one dataset")
    catalog = PUBLISHED_DATASETS if catalog is None else catalog
    transform = TrainTransform(options.flip_prob)
    dataset = ConcatCOCODataset([_open(n, options.root, catalog, True, transform, log) for n in options.dataset_names])
    groups = aspect_ratio_groups(dataset.aspect_ratios()) if options.aspect_grouping else None
    sampler = IterationBatchSampler(len(dataset), per_process, options.max_iter, options.start_iter, groups,
                                    options.rank, options.world_size, options.seed)
    return DataLoader(dataset, batch_sampler=sampler, **_loader_options(options.num_workers, options.pin_memory))


def build_test_loaders(options: TestLoaderOptions, catalog: Optional[Catalog] = None,
                       log: Callable[[str], None] = print) -> List[Tuple[str, COCODataset, DataLoader]]:
    """``(name, dataset, loader)`` per test dataset; each process reads its shard
    (:class:`ShardSampler`) at the original image size."""
    per_process = batch_size_per_process(options.ims_per_batch, options.world_size, "TEST.IMS_PER_BATCH")
    catalog = PUBLISHED_DATASETS if catalog is None else catalog
    loaders = []
    for name in options.dataset_names:
        dataset = _open(name, options.root, catalog, False, InferenceTransform(), log)
        batches = BatchSampler(ShardSampler(len(dataset), options.rank, options.world_size), per_process,
                               drop_last=False)
        loaders.append((name, dataset, DataLoader(dataset, batch_sampler=batches,
                                                  **_loader_options(options.num_workers, options.pin_memory))))
    return loaders
