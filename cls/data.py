"""ImageFolder reading, per-rank sampling and the data loaders.

Training sampling (differs from the published code, which drew every batch with replacement
from a generator seeded by the local rank): each rank reads a stream of distinct images. For
epoch ``e`` the stream is built from permutations of the whole dataset drawn from
``(seed, e, pass)`` (:class:`mabn.utils.data.RankPermutations`, stream ``(seed, e)``); every
permutation (its length rounded down to a multiple of the world size) is dealt round-robin to
the ranks, so within a pass no image goes to two ranks or twice to one. An epoch of
``--iters_per_epoch`` batches takes as many passes as it needs. Every sample also carries its
augmentation seed ``(seed, e, rank, position)``, so data order and augmentation are fixed by
``--seed`` alone, whatever the number of workers, and a resumed run continues the stream exactly.

Evaluation reads the WHOLE validation set once: rank ``r`` takes images ``r, r + W, r + 2W, ...``
(uneven shards, nothing duplicated or dropped) and the caller sums the results over ranks.

Loader workers start from a ``forkserver`` that has imported this module once and follow the
shared SIGTERM policy (:func:`mabn.utils.data.worker_options`). The dataset and transforms are
pickled to each worker once (training workers are persistent); the data stay the same for any
number of workers because every sample's augmentation seed comes from the sampler, not from the
worker.

Unreadable images are found before training: :func:`open_image_folder` reads the header of
every image (PIL's ``Image.open``, which parses the header without decoding the pixels) and
decodes with OpenCV only the files whose header PIL cannot parse or that declare more pixels
than OpenCV decodes. That finds files that are empty, not images, cut off inside the header or
too large; a file whose pixel data alone is damaged is still found only when it is read.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from mabn.utils.data import RankPermutations, ShardSampler, declared_size, load_bgr, opencv_max_pixels, worker_options
from mabn.utils.errors import UserError

__all__ = ["load_bgr", "check_image_file", "opencv_max_pixels", "AugmentedImageFolder", "TrainBatchSampler",
           "ShardSampler", "open_image_folder", "build_train_loader", "build_val_loader"]

def check_image_file(path: str) -> None:
    """Raise :class:`CorruptImageError` if ``path`` will not decode, cheaply: a header that PIL
    parses and that declares at most OpenCV's pixel limit is accepted without decoding;
    anything else is decoded with :func:`load_bgr`, which names the problem."""
    size, _ = declared_size(path)
    if size is not None and 0 < size[0] * size[1] <= opencv_max_pixels():
        return
    load_bgr(path)


def open_image_folder(root: str, flag: str, check_images: bool = True) -> ImageFolder:
    """An ImageFolder over ``root`` with the OpenCV loader; :class:`UserError` when missing or empty,
    and (``check_images``) :class:`CorruptImageError` naming the first image that will not decode
    (see :func:`check_image_file` and the module doc)."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"{flag} {root} is a file; give the directory holding <class>/<image> folders")
    if not os.path.isdir(root):
        raise UserError(f"{flag} {root}: no such directory")
    try:
        folder = ImageFolder(root, loader=load_bgr)
    except FileNotFoundError as exc:
        raise UserError(f"{flag} {root}: no images found (expected {root}/<class>/<image> with "
                        f"extensions {', '.join(IMG_EXTENSIONS)}; {str(exc).splitlines()[0]})") from None
    if len(folder) == 0:
        raise UserError(f"{flag} {root}: no images found")
    if check_images:
        for path, _ in folder.samples:
            check_image_file(path)
    return folder


class AugmentedImageFolder(Dataset):
    """An ImageFolder whose transform receives a per-sample random generator.

    Items are ``(index, seed)`` pairs from :class:`TrainBatchSampler` or plain indices
    (deterministic transforms, as for validation).
    """

    def __init__(self, folder: ImageFolder, transform):
        self.folder = folder
        self.transform = transform

    @property
    def classes(self) -> List[str]:
        return self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, seed = item
            rng = np.random.default_rng(seed)
        else:
            index, rng = item, None
        path, target = self.folder.samples[index]
        return self.transform(self.folder.loader(path), rng), target


class TrainBatchSampler(Sampler):
    """Per-rank batches of ``(index, augmentation seed)`` without replacement; see the module doc.

    ``set_epoch(epoch, start_step)`` selects the epoch (1-based) and the first batch to yield
    (for resuming inside an epoch); an iterator yields ``iters_per_epoch - start_step`` batches.
    """

    def __init__(self, num_samples: int, batch_size: int, iters_per_epoch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.permutations = RankPermutations(num_samples, rank, world_size)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.iters_per_epoch = iters_per_epoch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 1
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices for the whole of ``epoch``, in order."""
        return self.permutations.head((self.seed, epoch), self.iters_per_epoch * self.batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, Tuple[int, ...]]]]:
        indices = self.epoch_indices(self.epoch)
        for step in range(self.start_step, self.iters_per_epoch):
            first = step * self.batch_size
            yield [(int(indices[p]), (self.seed, self.epoch, self.rank, p))
                   for p in range(first, first + self.batch_size)]

    def __len__(self) -> int:
        return self.iters_per_epoch - self.start_step


def _loader_options(workers: int, device: torch.device) -> dict:
    options = {"pin_memory": device.type == "cuda",
               "generator": torch.Generator()}  # keep the global RNG out of the loader
    # The forkserver imports this module (torch, torchvision) and OpenCV once.
    options.update(worker_options(workers, [__name__, "cv2"]))
    if workers > 0:
        options["persistent_workers"] = True
    return options


def build_train_loader(dataset: Dataset, sampler: TrainBatchSampler, workers: int,
                       device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, **_loader_options(workers, device))


def build_val_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, workers: int,
                     device: torch.device) -> DataLoader:
    sampler = ShardSampler(len(dataset), rank, world_size)
    options = _loader_options(workers, device)
    options.pop("persistent_workers", None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)
