"""Image and target transforms, and where resizing and normalization happen.

The split of work between the data loader and the model (torchvision's
``GeneralizedRCNNTransform``, built from INPUT.* by the model):

* Training: the loader resizes each image (maskrcnn-benchmark's rule, :func:`resized_size`: a
  random choice of ``MIN_SIZE_TRAIN`` for the short side, lowered so the long side stays within
  ``MAX_SIZE_TRAIN``, sizes truncated to integers), flips it horizontally with probability
  ``HORIZONTAL_FLIP_PROB_TRAIN`` and converts it to the pixel convention. The random choices
  come from the per-sample seed of the batch sampler, so they are fixed by the training seed,
  whatever the number of workers, and a resumed run sees the same images. The model must
  therefore not resize training images again (a resize to the size an image already has is the
  identity, so with a single MIN_SIZE_TRAIN the model's own resize changes nothing).
* Testing: the loader only converts the pixel convention and keeps the original size; the model
  resizes to ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` and maps boxes and pasted masks back, so
  predictions come out in original image coordinates.
* Normalization (``PIXEL_MEAN`` / ``PIXEL_STD``) and padding to a batch always happen in the model.

Pixel convention: with ``TO_BGR255`` images are float32 (3, H, W) BGR in 0..255 (the published
PIXEL_MEAN is in that order and scale); without it RGB in 0..1. Boxes use continuous
coordinates (torchvision's: a box over pixels 0..w-1 spans x in [0, w]).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

__all__ = ["InferenceTransform", "TrainTransform", "hflip", "resize", "resized_size", "to_model_tensors"]

Target = Dict[str, np.ndarray]


def resized_size(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """``(height, width)`` after scaling the short side to ``min_size`` unless that takes the long
    side beyond ``max_size`` (then the short side shrinks), truncated as in maskrcnn-benchmark."""
    short, long = min(height, width), max(height, width)
    size = min_size
    if max_size > 0 and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize(image: np.ndarray, target: Target, height: int, width: int) -> Tuple[np.ndarray, Target]:
    """Resize the image (bilinear) and its masks (nearest) to ``height`` x ``width``; scale boxes."""
    old_height, old_width = image.shape[:2]
    if (old_height, old_width) == (height, width):
        return image, target
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    scale = np.array([width / old_width, height / old_height] * 2, dtype=np.float32)
    masks = target["masks"]
    resized = np.zeros((len(masks), height, width), dtype=masks.dtype)
    for k, mask in enumerate(masks):
        resized[k] = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
    return image, {**target, "boxes": target["boxes"] * scale, "masks": resized}


def hflip(image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
    """Mirror the image, its masks and its boxes left to right."""
    width = image.shape[1]
    boxes = target["boxes"].copy()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return (np.ascontiguousarray(image[:, ::-1]),
            {**target, "boxes": boxes, "masks": np.ascontiguousarray(target["masks"][:, :, ::-1])})


def to_model_tensors(image: np.ndarray, target: Target, to_bgr255: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The BGR uint8 image as the model's float32 (3, H, W) tensor (see the module doc) and the
    target as tensors (boxes float32, labels int64, masks uint8)."""
    pixels = image if to_bgr255 else image[:, :, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float()
    if not to_bgr255:
        tensor /= 255.0
    return tensor, {"boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)),
                    "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], dtype=np.int64)),
                    "masks": torch.from_numpy(np.ascontiguousarray(target["masks"], dtype=np.uint8))}


class TrainTransform:
    """Random resize (:func:`resized_size`), random horizontal flip, pixel convention."""

    def __init__(self, min_sizes: Sequence[int], max_size: int, flip_prob: float, to_bgr255: bool):
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.to_bgr255 = bool(to_bgr255)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator):
        min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        image, target = resize(image, target, *resized_size(*image.shape[:2], min_size, self.max_size))
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        return to_model_tensors(image, target, self.to_bgr255)


class InferenceTransform:
    """Pixel convention only: the model resizes test images and maps predictions back."""

    def __init__(self, to_bgr255: bool):
        self.to_bgr255 = bool(to_bgr255)

    def __call__(self, image: np.ndarray, target: Target, rng: Optional[np.random.Generator] = None):
        """``rng`` is unused (the transform is deterministic)."""
        return to_model_tensors(image, target, self.to_bgr255)
