"""cls.transforms: the published OpenCV augmentation."""
from __future__ import annotations

import numpy as np
import torch

import pytest

from cls.transforms import (EIGVAL, EIGVEC, CenterCrop, Lighting, RandomHorizontalFlip, RandomResizedCrop,
                            ResizeShortSide, TrainTransform, ValTransform, val_resize_size)


def _image(h=48, w=64):
    return np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_train_transform_shape_range_and_determinism():
    transform = TrainTransform(32)
    a = transform(_image(), np.random.default_rng(3))
    b = transform(_image(), np.random.default_rng(3))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 255


def test_random_resized_crop_pads_when_no_crop_fits():
    # A 4x100 strip: square crops of >= 8% of the area never fit its height, so the last attempt is padded.
    out = RandomResizedCrop(16)(np.full((4, 100, 3), 200, np.uint8), np.random.default_rng(0))
    assert out.shape == (16, 16, 3) and (out == 0).any() and (out == 200).any()


def test_lighting_matches_published_rule_on_rgb():
    """Published: RGB image + eigvec[::-1] @ (eigval * alpha); ours: the same on the BGR array."""
    bgr = _image()
    alpha = np.random.default_rng(11).normal(0.0, 0.1, size=3).astype(np.float32)
    ours = Lighting()(bgr, np.random.default_rng(11))
    rgb = bgr[:, :, ::-1].astype(np.float32) / 255
    rgb = rgb + (EIGVEC[::-1, :] @ (EIGVAL * alpha)).reshape(1, 1, 3)
    published = np.uint8(np.clip(rgb * 255, 0, 255))[:, :, ::-1]
    assert np.abs(ours.astype(int) - published.astype(int)).max() <= 1


def test_val_transform_sizes_scale_with_image_size():
    assert val_resize_size(224) == 256 and val_resize_size(32) == 37
    resized = ResizeShortSide(256)(_image(300, 500))
    assert resized.shape[:2] == (256, int(256 / 300 * 500 + 0.5))
    assert CenterCrop(224)(resized).shape[:2] == (224, 224)
    out = ValTransform(32)(_image(40, 40))
    assert out.shape == (3, 32, 32)


def test_bgr_order_kept():
    image = np.zeros((40, 40, 3), np.uint8)
    image[..., 0] = 255  # blue in OpenCV's BGR
    out = ValTransform(32)(image)
    assert out[0].min() == 255 and out[1].max() == 0 and out[2].max() == 0


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 2, 3), (2, 1, 3), (1, 300, 3), (300, 1, 3), (3, 3, 3)])
def test_tiny_and_thin_images_are_upscaled(shape):
    image = np.full(shape, 100, np.uint8)
    for seed in range(40):  # every path: crops inside, padded crops, flips
        out = TrainTransform(16)(image, np.random.default_rng(seed))
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    out = ValTransform(16)(image)
    assert out.shape == (3, 16, 16) and torch.all(out == 100)


def test_flip_of_a_one_pixel_wide_image_is_a_plain_array():
    image = np.arange(3, dtype=np.uint8).reshape(1, 1, 3)
    always = RandomHorizontalFlip(p=1.0)
    flipped = always(image, np.random.default_rng(0))
    assert all(stride >= 0 for stride in flipped.strides) and np.array_equal(flipped, image)
