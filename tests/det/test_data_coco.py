"""det.data.coco and det.data.catalog: filtering, contiguous labels, polygon and RLE masks, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from det.config.paths_catalog import DATASETS as PUBLISHED
from det.data.catalog import resolve_dataset
from det.data.coco import COCODataset
from mabn.utils.errors import CorruptImageError, UserError

HEIGHT, WIDTH = 24, 32
CATEGORY_IDS = (2, 7, 40)  # not contiguous, like COCO's


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    flat = mask.astype(np.uint8).flatten(order="F")  # uncompressed: run lengths, starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _rect(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _write_dataset(root: Path, images=None, annotations=None) -> tuple:
    """Three images: 1 with a polygon, an uncompressed RLE, a compressed RLE, a crowd region and a
    sub-pixel box; 2 with a crowd region only; 3 without annotations."""
    img_dir, ann_file = root / "images", root / "annotations.json"
    img_dir.mkdir(parents=True)
    images = images or [{"id": i, "file_name": f"{i}.png", "height": HEIGHT, "width": WIDTH} for i in (1, 2, 3)]
    for info in images:
        pixels = np.random.default_rng(info["id"]).integers(0, 255, (info["height"], info["width"], 3), np.uint8)
        cv2.imwrite(str(img_dir / info["file_name"]), pixels)
    crowd = _rle(_rect(0, 0, 6, 6), compressed=False)
    annotations = annotations if annotations is not None else [
        {"id": 1, "image_id": 1, "category_id": 40, "iscrowd": 0, "bbox": [2, 3, 8, 6], "area": 48,
         "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [12, 4, 6, 10], "area": 60,
         "segmentation": _rle(_rect(12, 4, 18, 14), compressed=False)},
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0, "bbox": [20, 10, 12, 14], "area": 168,
         "segmentation": _rle(_rect(20, 10, 32, 24), compressed=True)},
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 1, "bbox": [0, 0, 6, 6], "area": 36, "segmentation": crowd},
        {"id": 5, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [5, 5, 0.5, 4], "area": 2,
         "segmentation": [[5, 5, 5.5, 5, 5.5, 9, 5, 9]]},
        {"id": 6, "image_id": 2, "category_id": 2, "iscrowd": 1, "bbox": [0, 0, 6, 6], "area": 36, "segmentation": crowd},
    ]
    categories = [{"id": c, "name": f"thing{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(img_dir), str(ann_file)


@pytest.fixture
def files(tmp_path):
    return _write_dataset(tmp_path)


def test_training_drops_crowd_degenerate_and_empty(files):
    train = COCODataset("toy", *files, remove_images_without_annotations=True)
    assert len(train) == 1 and train.image_id(0) == 1
    image, target = train.raw_item(0)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(target["boxes"], [[2, 3, 10, 9], [12, 4, 18, 14], [20, 10, 32, 24]])
    assert target["boxes"].dtype == np.float32 and target["labels"].dtype == np.int64
    assert target["labels"].tolist() == [3, 1, 2]


def test_testing_keeps_every_image(files):
    test = COCODataset("toy", *files, remove_images_without_annotations=False)
    assert [test.image_id(i) for i in range(len(test))] == [1, 2, 3]
    _, target = test.raw_item(1)  # only a crowd region: an empty target of the right shapes
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, HEIGHT, WIDTH)
    assert test.image_size(2) == (HEIGHT, WIDTH)
    np.testing.assert_allclose(test.aspect_ratios(), [HEIGHT / WIDTH] * 3)


def test_category_mapping_round_trip(files):
    dataset = COCODataset("toy", *files, remove_images_without_annotations=True)
    assert dataset.category_to_contiguous == {2: 1, 7: 2, 40: 3}
    assert {dataset.contiguous_to_category[dataset.category_to_contiguous[c]] for c in CATEGORY_IDS} == set(CATEGORY_IDS)
    assert dataset.category_names[40] == "thing40"


def test_polygon_and_rle_masks_decode(files):
    dataset = COCODataset("toy", *files, remove_images_without_annotations=True)
    _, target = dataset.raw_item(0)
    masks = target["masks"]
    assert masks.dtype == np.uint8 and masks.shape == (3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(masks[1], _rect(12, 4, 18, 14))  # uncompressed RLE
    np.testing.assert_array_equal(masks[2], _rect(20, 10, 32, 24))  # compressed RLE
    ys, xs = np.nonzero(masks[0])  # polygon over x 2..10, y 3..9
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (2, 3, 10, 9)


def test_items_carry_index_and_use_the_transform(files):
    calls = []

    def transform(image, target, rng):
        calls.append(rng.integers(1 << 30))
        return image, target

    dataset = COCODataset("toy", *files, remove_images_without_annotations=False, transform=transform)
    assert dataset[2][2] == 2 and dataset[(0, (1, 2))][2] == 0 and dataset[(0, (1, 2))][2] == 0
    assert calls[1] == calls[2]  # the same augmentation seed gives the same random stream


def test_missing_files_show_the_layout(tmp_path, files):
    img_dir, ann_file = files
    with pytest.raises(UserError, match=r"annotation file .*missing\.json not found \(expected my layout\)"):
        COCODataset("toy", img_dir, str(tmp_path / "missing.json"), True, layout="my layout")
    with pytest.raises(UserError, match=r"image folder .*nowhere not found"):
        COCODataset("toy", str(tmp_path / "nowhere"), ann_file, True)


def test_published_names_resolve_under_the_data_root(tmp_path):
    files = resolve_dataset("coco_2014_minival", str(tmp_path), PUBLISHED)
    assert files.img_dir == str(tmp_path / "coco" / "val2014")
    assert files.ann_file == str(tmp_path / "coco" / "annotations" / "instances_minival2014.json")
    with pytest.raises(UserError) as error:
        COCODataset(files.name, files.img_dir, files.ann_file, True, layout=files.layout)
    message = str(error.value)
    assert "coco/annotations/instances_minival2014.json" in message and str(tmp_path) in message
    assert "coco/val2014/" in message and "DATASETS.ROOT" in message and "\n" not in message


def test_unknown_name_lists_the_registered_ones(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'coco_2015_train'; registered: .*coco_2014_minival.*shapes_val"):
        resolve_dataset("coco_2015_train", str(tmp_path), PUBLISHED)


def test_corrupt_image_names_the_file(files):
    img_dir, ann_file = files
    Path(img_dir, "1.png").write_bytes(b"not a png")
    dataset = COCODataset("toy", img_dir, ann_file, True)
    with pytest.raises(CorruptImageError, match=r"1\.png"):
        dataset.raw_item(0)
    Path(img_dir, "1.png").unlink()
    with pytest.raises(CorruptImageError, match=r"1\.png"):
        dataset.raw_item(0)


def test_image_size_disagreeing_with_annotations(files):
    img_dir, ann_file = files
    cv2.imwrite(str(Path(img_dir, "1.png")), np.zeros((HEIGHT + 1, WIDTH, 3), np.uint8))
    with pytest.raises(UserError, match=r"1\.png.* is 32x25 pixels but .* says 32x24"):
        COCODataset("toy", img_dir, ann_file, True).raw_item(0)


def test_empty_after_filtering_and_bad_json(tmp_path):
    only_crowd = [{"id": 1, "image_id": 1, "category_id": 2, "iscrowd": 1, "bbox": [0, 0, 6, 6], "area": 36,
                   "segmentation": _rle(_rect(0, 0, 6, 6), compressed=False)}]
    img_dir, ann_file = _write_dataset(tmp_path / "crowd", annotations=only_crowd)
    with pytest.raises(UserError, match="no images with a usable"):
        COCODataset("toy", img_dir, ann_file, True)
    assert len(COCODataset("toy", img_dir, ann_file, False)) == 3
    Path(ann_file).write_text("{not json")
    with pytest.raises(UserError, match="not a COCO annotation file"):
        COCODataset("toy", img_dir, ann_file, False)
