"""det.data.shapes: deterministic COCO-format data, exact masks and boxes, one-time atomic writing."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from det.data.shapes import SHAPES, category_id, dataset_name, ensure_shapes_dataset, render_image

SMALL = dict(seed=3, categories=4, train_images=12, val_images=4, image_size=64)


def _quiet(*_args) -> None:
    pass


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), log=_quiet, **SMALL)


def test_render_is_a_function_of_its_arguments():
    image, annotations = render_image(0, "train", 5, 3, 96)
    again, same = render_image(0, "train", 5, 3, 96)
    assert image.dtype == np.uint8 and image.ndim == 3 and max(image.shape[:2]) <= 96
    assert np.array_equal(image, again) and annotations == same
    for other_image, other_annotations in (render_image(1, "train", 5, 3, 96), render_image(0, "val", 5, 3, 96),
                                           render_image(0, "train", 6, 3, 96)):
        assert other_image.shape != image.shape or not np.array_equal(image, other_image)
        assert other_annotations != annotations


def test_files_load_in_pycocotools_and_masks_match_boxes(small):
    kinds = set()
    for split, count in (("train", 12), ("val", 4)):
        coco = _coco(small.ann_file(split))
        assert len(coco.imgs) == count
        assert sorted(coco.cats) == [category_id(k) for k in range(4)] == [1, 3, 5, 7]
        assert [coco.cats[c]["name"] for c in sorted(coco.cats)] == list(SHAPES[:4])
        for image_id, info in coco.imgs.items():
            image = cv2.imread(str(small.img_dir(split) / info["file_name"]))
            assert image.shape[:2] == (info["height"], info["width"])
            annotations = coco.imgToAnns[image_id]
            assert 1 <= len(annotations) <= 4
            union = np.zeros(image.shape[:2], bool)
            for annotation in annotations:
                kinds.add(type(annotation["segmentation"]).__name__)
                mask = coco.annToMask(annotation).astype(bool)
                ys, xs = np.nonzero(mask)
                x, y, w, h = annotation["bbox"]
                assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert annotation["area"] == mask.sum() >= 40 and annotation["iscrowd"] == 0
                assert not (union & mask).any()  # visible parts: no pixel belongs to two objects
                union |= mask
    assert kinds == {"list", "dict"}  # polygons and RLE both occur


def test_written_dataset_is_deterministic_and_atomic(tmp_path, small):
    again = ensure_shapes_dataset(tmp_path / "a", log=_quiet, **SMALL)
    other = ensure_shapes_dataset(tmp_path / "b", log=_quiet, **{**SMALL, "seed": 4})
    assert again.root.name == small.root.name == dataset_name(3, 4, 12, 4, 64)
    assert _digest(again.root) == _digest(small.root) != _digest(other.root)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [again.root.name, again.root.name + ".lock"]
    assert json.loads((again.root / "meta.json").read_text())["train"] == 12


def test_existing_dataset_is_reused(tmp_path):
    first = ensure_shapes_dataset(tmp_path, log=_quiet, **SMALL)
    stamp = (first.root / "meta.json").stat().st_mtime_ns
    messages = []
    assert ensure_shapes_dataset(tmp_path, log=messages.append, **SMALL).root == first.root
    assert messages == [] and (first.root / "meta.json").stat().st_mtime_ns == stamp


def test_partial_directory_without_marker_is_replaced(tmp_path):
    target = tmp_path / dataset_name(**{k: SMALL[k] for k in SMALL})
    (target / "train").mkdir(parents=True)
    (target / "train" / "junk.png").write_bytes(b"")
    shapes = ensure_shapes_dataset(tmp_path, log=_quiet, **SMALL)
    assert not (shapes.img_dir("train") / "junk.png").exists() and len(list(shapes.img_dir("train").iterdir())) == 12


def _writer(cache: str, queue) -> None:
    shapes = ensure_shapes_dataset(cache, log=lambda *_: queue.put("wrote"), **SMALL)
    queue.put(_digest(shapes.root))


def test_concurrent_writers_produce_one_dataset(tmp_path):
    context = multiprocessing.get_context("fork")  # the writer uses no threads: forking is safe
    queue = context.Queue()
    processes = [context.Process(target=_writer, args=(str(tmp_path), queue)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    messages = [queue.get(timeout=5) for _ in range(3)]
    assert messages.count("wrote") == 1 and len(set(m for m in messages if m != "wrote")) == 1


def test_bad_parameters():
    with pytest.raises(ValueError, match="categories"):
        render_image(0, "train", 0, categories=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="image_size"):
        ensure_shapes_dataset("/nonexistent", image_size=8)


def test_rle_segmentation_decodes_to_the_visible_mask(small):
    coco = _coco(small.ann_file("train"))
    rle_annotations = [a for a in coco.dataset["annotations"] if isinstance(a["segmentation"], dict)]
    assert rle_annotations
    for annotation in rle_annotations:
        decoded = mask_utils.decode(annotation["segmentation"])
        assert np.array_equal(decoded, coco.annToMask(annotation))
