"""The published ImageNet augmentation, on OpenCV BGR uint8 arrays.

Training: random-resized square crop (area 8%-100% of the image, at least one pixel, resized up
or down to the crop size; zero padding when no crop fits after 10 attempts), PCA lighting noise (AlexNet style, std 0.1), horizontal flip, then a float
BGR tensor in 0-255 with no mean subtraction. Validation: resize the short side to
``round(size * 256 / 224)`` (256 for 224) and take the central ``size`` square.

Randomness comes from a ``numpy.random.Generator`` passed per call, so the augmentation of a
sample is fixed by its seed (see :mod:`cls.data`), whatever the number of loader workers.

Colour order: the published code added ``eigvec[::-1] @ (eigval * alpha)`` to an RGB image, i.e.
the listed eigenvector rows act on the B, G, R channels in that order. On a BGR array that is
``eigvec @ (eigval * alpha)`` added channel by channel, which is what :class:`Lighting` does.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

__all__ = ["EIGVAL", "EIGVEC", "RandomResizedCrop", "Lighting", "RandomHorizontalFlip", "ToBGRTensor",
           "ResizeShortSide", "CenterCrop", "TrainTransform", "ValTransform", "val_resize_size"]

EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
EIGVEC = np.array([[-0.5836, -0.6948, 0.4203],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5675, 0.7192, 0.4009]], dtype=np.float32)


def val_resize_size(image_size: int) -> int:
    """Short side before the validation center crop: 256 for 224, scaled with the crop."""
    return int(round(image_size * 256 / 224))


class RandomResizedCrop:
    """A random square crop of ``scale`` of the area, resized to ``size`` x ``size``."""

    def __init__(self, size: int, scale=(0.08, 1.0), max_attempts: int = 10):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        self.size = size
        self.scale = scale
        self.max_attempts = max_attempts

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        for _ in range(self.max_attempts):
            edge = max(1, int(round(math.sqrt(height * width * rng.uniform(*self.scale)))))
            spare_h, spare_w = height - edge, width - edge
            left = int(rng.integers(min(spare_w, 0), max(spare_w, 0) + 1))
            top = int(rng.integers(min(spare_h, 0), max(spare_h, 0) + 1))
            if spare_h >= 0 and spare_w >= 0:
                crop = image[top:top + edge, left:left + edge]
                break
        else:  # the last attempt sticks out of the image: pad the missing part with zeros
            inside = image[max(top, 0):min(top + edge, height), max(left, 0):min(left + edge, width)]
            crop = cv2.copyMakeBorder(inside, max(-top, 0), max(top + edge - height, 0), max(-left, 0),
                                      max(left + edge - width, 0), cv2.BORDER_CONSTANT, value=0)
        return cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_LINEAR)


class Lighting:
    """PCA lighting noise: add ``EIGVEC @ (EIGVAL * alpha)``, ``alpha ~ N(0, std)``, in 0-1 units."""

    def __init__(self, std: float = 0.1, eigval: np.ndarray = EIGVAL, eigvec: np.ndarray = EIGVEC):
        self.std = std
        self.eigval = np.asarray(eigval, dtype=np.float32)
        self.eigvec = np.asarray(eigvec, dtype=np.float32)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        alpha = rng.normal(0.0, self.std, size=3).astype(np.float32)
        shift = (self.eigvec @ (self.eigval * alpha)) * 255.0
        out = image.astype(np.float32) + shift.reshape(1, 1, 3)
        np.clip(out, 0.0, 255.0, out=out)
        return out.astype(np.uint8)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1].copy() if rng.random() < self.p else image  # a copy: no negative strides


class ToBGRTensor:
    """(H, W, 3) BGR uint8 -> (3, H, W) float32 tensor in 0-255."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()


class ResizeShortSide:
    """Resize so that the short side is ``size`` (the long side rounded half up)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if height < width:
            target = (int(self.size / height * width + 0.5), self.size)
        else:
            target = (self.size, int(self.size / width * height + 0.5))
        return cv2.resize(image, target, interpolation=cv2.INTER_LINEAR)


class CenterCrop:
    """The central ``size`` x ``size`` square (offsets rounded like torchvision's CenterCrop)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if height < self.size or width < self.size:
            raise ValueError(f"image of {width}x{height} is smaller than the {self.size}-pixel center crop")
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        return image[top:top + self.size, left:left + self.size]


class TrainTransform:
    """Crop, lighting, flip, tensor: the published training pipeline."""

    def __init__(self, image_size: int):
        self.crop = RandomResizedCrop(image_size)
        self.lighting = Lighting()
        self.flip = RandomHorizontalFlip()
        self.to_tensor = ToBGRTensor()

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        image = self.crop(image, rng)
        image = self.lighting(image, rng)
        image = self.flip(image, rng)
        return self.to_tensor(image)


class ValTransform:
    """Short-side resize and center crop (deterministic)."""

    def __init__(self, image_size: int):
        self.resize = ResizeShortSide(val_resize_size(image_size))
        self.crop = CenterCrop(image_size)
        self.to_tensor = ToBGRTensor()

    def __call__(self, image: np.ndarray, rng=None) -> torch.Tensor:
        return self.to_tensor(self.crop(self.resize(image)))
