"""det.data.transforms: flips that keep boxes on their masks, seeded augmentation, the model's
input convention; and the hand-over to the model's transform, which resizes and normalizes."""
from __future__ import annotations

import numpy as np
import torch

from det.data.transforms import InferenceTransform, TrainTransform, hflip, to_tensors
from det.modeling.transform import DetectionTransform

PIXEL_MEAN = (102.9801, 115.9465, 122.7717)


def _mask_box(mask) -> list:
    ys, xs = np.nonzero(np.asarray(mask))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _sample(height: int = 30, width: int = 40) -> tuple:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    masks = np.zeros((2, height, width), np.uint8)
    masks[0, 4:10, 3:15] = 1
    masks[1, 12:28, 20:38] = 1
    target = {"boxes": np.array([[3, 4, 15, 10], [20, 12, 38, 28]], np.float32),
              "labels": np.array([1, 2], np.int64), "masks": masks}
    return image, target


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
    assert flipped["labels"] is target["labels"]


def test_train_transform_is_seeded_and_flips_half_the_time():
    image, target = _sample()
    transform = TrainTransform(0.5)
    first = transform(image, target, np.random.default_rng(7))
    second = transform(image, target, np.random.default_rng(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])
    flips = [bool(transform(image, target, np.random.default_rng(seed))[1]["boxes"][0, 0] > 20) for seed in range(40)]
    assert 5 < sum(flips) < 35


def test_no_flip_at_probability_zero_and_always_at_one():
    image, target = _sample()
    kept = TrainTransform(0.0)(image, target, np.random.default_rng(0))[1]
    mirrored = TrainTransform(1.0)(image, target, np.random.default_rng(0))[1]
    np.testing.assert_array_equal(kept["boxes"].numpy(), target["boxes"])
    np.testing.assert_array_equal(mirrored["boxes"].numpy(), hflip(image, target)[1]["boxes"])
    np.testing.assert_array_equal(mirrored["masks"].numpy(), hflip(image, target)[1]["masks"])


def test_model_input_convention_and_dtypes():
    image, target = _sample()
    tensor, out = InferenceTransform()(image, target)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 30, 40)
    assert torch.allclose(tensor * 255.0, torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float())
    assert out["boxes"].dtype == torch.float32 and out["labels"].dtype == torch.int64
    assert out["masks"].dtype == torch.uint8 and out["masks"].shape == (2, 30, 40)


def test_model_transform_receives_the_published_pixel_convention():
    image, target = _sample()
    transform = DetectionTransform((30,), 1000, 30, 1000, PIXEL_MEAN, (1.0, 1.0, 1.0), True, 1).train()
    tensor, out = to_tensors(image, target)
    batch, targets = transform([tensor], [out])
    bgr255 = torch.from_numpy(image).permute(2, 0, 1).float()  # the file's BGR bytes
    expected = bgr255 - torch.tensor(PIXEL_MEAN)[:, None, None]
    assert torch.allclose(batch.tensors[0], expected, atol=1e-3)
    assert torch.equal(targets[0]["boxes"], out["boxes"])


def test_model_transform_resizes_boxes_with_masks():
    image, target = _sample()
    transform = DetectionTransform((60, 90), 1000, 45, 1000, PIXEL_MEAN, (1.0, 1.0, 1.0), True, 32).train()
    tensor, out = to_tensors(image, target)
    shorts = set()
    with torch.random.fork_rng():  # the model draws the size from the global generator
        torch.manual_seed(0)
        for _ in range(12):
            batch, targets = transform([tensor], [out])
            (height, width), resized = batch.image_sizes[0], targets[0]
            shorts.add(min(height, width))
            assert resized["masks"].shape[1:] == (height, width)
            for box, mask in zip(resized["boxes"], resized["masks"]):
                assert np.allclose(_mask_box(mask), box.numpy(), atol=1.5)
    assert shorts == {60, 90}
