"""det.data.transforms: maskrcnn-benchmark's resize rule, flips and resizes that keep boxes on
their masks, the pixel convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from det.data.transforms import InferenceTransform, TrainTransform, hflip, resize, resized_size


def _mask_box(mask: np.ndarray) -> list:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _sample(height: int = 30, width: int = 40) -> tuple:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    masks = np.zeros((2, height, width), np.uint8)
    masks[0, 4:10, 3:15] = 1
    masks[1, 12:28, 20:38] = 1
    target = {"boxes": np.array([[3, 4, 15, 10], [20, 12, 38, 28]], np.float32),
              "labels": np.array([1, 2], np.int64), "masks": masks}
    return image, target


@pytest.mark.parametrize("height, width, min_size, max_size, expected", [
    (480, 640, 800, 1333, (800, 1066)),     # short side to 800, long side truncated
    (640, 480, 800, 1333, (1066, 800)),
    (100, 1000, 800, 1333, (133, 1330)),    # capped: short side round(133.3), long int(133 * 10)
    (800, 900, 800, 1333, (800, 900)),      # already there
    (96, 128, 128, 213, (128, 170)),
])
def test_resized_size_follows_maskrcnn_benchmark(height, width, min_size, max_size, expected):
    assert resized_size(height, width, min_size, max_size) == expected


def test_resize_moves_boxes_with_masks():
    image, target = _sample()
    resized_image, resized = resize(image, target, 60, 80)
    assert resized_image.shape == (60, 80, 3) and resized["masks"].shape == (2, 60, 80)
    np.testing.assert_allclose(resized["boxes"], target["boxes"] * 2)
    for box, mask in zip(resized["boxes"], resized["masks"]):
        assert _mask_box(mask) == box.tolist()
    assert resized["labels"] is target["labels"]
    same_image, same = resize(image, target, 30, 40)
    assert same_image is image and same is target


def test_hflip_moves_boxes_with_masks_and_is_an_involution():
    image, target = _sample()
    flipped_image, flipped = hflip(image, target)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped["boxes"], [[25, 4, 37, 10], [2, 12, 20, 28]])
    for box, mask in zip(flipped["boxes"], flipped["masks"]):
        assert _mask_box(mask) == box.tolist()
    back_image, back = hflip(flipped_image, flipped)
    np.testing.assert_array_equal(back_image, image)
    np.testing.assert_array_equal(back["boxes"], target["boxes"])
    np.testing.assert_array_equal(back["masks"], target["masks"])


def test_train_transform_is_seeded_and_draws_sizes_and_flips():
    image, target = _sample()
    transform = TrainTransform((60, 90), 1000, 0.5, to_bgr255=True)
    first = transform(image, target, np.random.default_rng(7))
    second = transform(image, target, np.random.default_rng(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])
    sizes, flips = set(), set()
    for seed in range(40):
        tensor, out = transform(image, target, np.random.default_rng(seed))
        short = min(tensor.shape[1:])
        sizes.add(short)
        flips.add(bool(out["boxes"][0, 0] > tensor.shape[2] / 2))  # the first object starts on the left
        for box, mask in zip(out["boxes"], out["masks"]):
            assert torch.allclose(torch.tensor(_mask_box(mask.numpy()), dtype=torch.float32), box, atol=1.0)
    assert sizes == {60, 90} and flips == {False, True}


def test_no_flip_at_probability_zero_and_always_at_one():
    image, target = _sample()
    kept = TrainTransform((30,), 1000, 0.0, True)(image, target, np.random.default_rng(0))[1]
    mirrored = TrainTransform((30,), 1000, 1.0, True)(image, target, np.random.default_rng(0))[1]
    np.testing.assert_array_equal(kept["boxes"].numpy(), target["boxes"])
    np.testing.assert_array_equal(mirrored["boxes"].numpy(), hflip(image, target)[1]["boxes"])


def test_pixel_convention_and_dtypes():
    image, target = _sample()
    bgr, out = InferenceTransform(to_bgr255=True)(image, target)
    rgb, _ = InferenceTransform(to_bgr255=False)(image, target)
    assert bgr.dtype == rgb.dtype == torch.float32 and bgr.shape == (3, 30, 40)
    assert torch.equal(bgr, torch.from_numpy(image).permute(2, 0, 1).float())  # BGR, 0..255
    assert torch.allclose(rgb, bgr.flip(0) / 255.0) and float(rgb.max()) <= 1.0  # RGB, 0..1
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (2, 30, 40)
