"""Input transform: torchvision's resize and batching with the published pixel convention.

Models take what torchvision's detection models take: a list of (3, H, W) float RGB images in
[0, 1] at their original size. :class:`DetectionTransform` resizes them (a random side from
``INPUT.MIN_SIZE_TRAIN`` in training, ``MIN_SIZE_TEST`` in eval, capped by the matching max size),
converts them to BGR 0-255 when ``TO_BGR255`` (the published convention: Caffe2-style means
``PIXEL_MEAN`` in BGR order, ``PIXEL_STD`` 1), normalizes, and pads the batch to a multiple of
``SIZE_DIVISIBILITY``. Detections come back in original image coordinates.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = ["DetectionTransform"]


class DetectionTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` with separate train/test sizes and the BGR-255 convention."""

    def __init__(self, min_size_train: Sequence[int], max_size_train: int, min_size_test: int, max_size_test: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], to_bgr255: bool,
                 size_divisibility: int) -> None:
        self.train_sizes: Tuple[Tuple[int, ...], int] = (tuple(int(s) for s in min_size_train), int(max_size_train))
        self.test_sizes: Tuple[Tuple[int, ...], int] = ((int(min_size_test),), int(max_size_test))
        super().__init__(self.train_sizes[0], self.train_sizes[1], list(pixel_mean), list(pixel_std),
                         size_divisible=max(int(size_divisibility), 1))
        self.to_bgr255 = bool(to_bgr255)

    @property
    def min_size(self) -> Tuple[int, ...]:
        """Candidate short sides: the training ones in training mode, the test one in eval."""
        return (self.train_sizes if self.training else self.test_sizes)[0]

    @min_size.setter
    def min_size(self, value: Sequence[int]) -> None:
        self.train_sizes = (tuple(value), self.train_sizes[1])

    @property
    def max_size(self) -> int:
        return (self.train_sizes if self.training else self.test_sizes)[1]

    @max_size.setter
    def max_size(self, value: int) -> None:
        self.train_sizes = (self.train_sizes[0], int(value))

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float RGB images in [0, 1], got dtype {image.dtype}")
        if self.to_bgr255:
            image = image.flip(0) * 255.0
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train sizes={self.train_sizes}, test sizes={self.test_sizes}, "
                f"to_bgr255={self.to_bgr255}, mean={self.image_mean}, std={self.image_std}, "
                f"size_divisible={self.size_divisible})")
