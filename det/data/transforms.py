"""Image and target transforms of the data loader, and where the rest of the input pipeline lives.

The loader hands the model what torchvision's detection models take: float32 (3, H, W) RGB
images in [0, 1] at their original size, with targets ``{"boxes": (N, 4) float32 xyxy,
"labels": (N,) int64, "masks": (N, H, W) uint8}`` at the same size. Boxes use continuous
coordinates (a box over pixels 0..w-1 spans x in [0, w]).

* Training: the loader flips each image and its target horizontally with probability
  ``INPUT.HORIZONTAL_FLIP_PROB_TRAIN``, drawn from the per-sample seed of the batch sampler, so
  flips are fixed by the training seed whatever the number of workers.
* The model's input transform (``det.modeling.transform.DetectionTransform``, torchvision's
  ``GeneralizedRCNNTransform``) does the rest, in training and at test time alike: the resize
  (a random choice of ``MIN_SIZE_TRAIN`` for the short side, capped by ``MAX_SIZE_TRAIN``; at
  test time ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) of images, boxes and masks, the pixel
  convention (BGR 0-255 with ``TO_BGR255``), normalization by ``PIXEL_MEAN`` / ``PIXEL_STD``
  and padding to ``SIZE_DIVISIBILITY``; it maps predictions back to the original size, so the
  evaluator receives boxes in original coordinates and masks pasted at the image resolution.
  One resize implementation serves training, testing and the predictor.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["InferenceTransform", "TrainTransform", "hflip", "to_tensors"]

Target = Dict[str, np.ndarray]


def hflip(image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
    """Mirror the image, its masks and its boxes left to right."""
    width = image.shape[1]
    boxes = target["boxes"].copy()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return (np.ascontiguousarray(image[:, ::-1]),
            {**target, "boxes": boxes, "masks": np.ascontiguousarray(target["masks"][:, :, ::-1])})


def to_tensors(image: np.ndarray, target: Target) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The BGR uint8 (H, W, 3) image as a float32 (3, H, W) RGB tensor in [0, 1], and the target as
    tensors (boxes float32, labels int64, masks uint8)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1))).float().div_(255.0)
    return tensor, {"boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"], dtype=np.float32)),
                    "labels": torch.from_numpy(np.ascontiguousarray(target["labels"], dtype=np.int64)),
                    "masks": torch.from_numpy(np.ascontiguousarray(target["masks"], dtype=np.uint8))}


class TrainTransform:
    """Random horizontal flip, then :func:`to_tensors`."""

    def __init__(self, flip_prob: float):
        self.flip_prob = float(flip_prob)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator):
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        return to_tensors(image, target)


class InferenceTransform:
    """:func:`to_tensors` only (``rng`` is unused)."""

    def __call__(self, image: np.ndarray, target: Target, rng: Optional[np.random.Generator] = None):
        return to_tensors(image, target)
