"""COCO-format instance segmentation read through pycocotools.

An item is ``(image, target, index)`` where ``image`` and ``target`` come out of the dataset's
transform (:mod:`det.data.transforms`) applied to the BGR uint8 image and the raw target
``{"boxes": (N, 4) float32 xyxy, "labels": (N,) int64 in 1..K, "masks": (N, H, W) uint8}``.
Labels are contiguous: the sorted category ids map to 1..K (0 is the background of torchvision's
Mask R-CNN) and :attr:`COCODataset.contiguous_to_category` maps them back for evaluation.

Annotations are filtered as in maskrcnn-benchmark: crowd regions never become targets (COCOeval
reads them from the annotation file as regions to ignore); boxes are clipped to the image and
those narrower or lower than one pixel are dropped. With ``remove_images_without_annotations``
(training) images left without a target are skipped. The dataset keeps only compact per-image
records, not the pycocotools index, so it pickles cheaply into spawned workers; the index is
rebuilt on demand for evaluation (:meth:`COCODataset.coco`).
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils

from mabn.utils.data import load_bgr
from mabn.utils.errors import UserError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

__all__ = ["COCODataset", "load_coco"]

Target = Dict[str, np.ndarray]


def load_coco(ann_file: str) -> "COCO":
    """A pycocotools index of ``ann_file`` (its progress prints silenced); :class:`UserError` when
    the file is not a COCO annotation file."""
    from pycocotools.coco import COCO  # imports matplotlib: kept out of the data loader workers

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(ann_file)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"{ann_file}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: List[Dict[str, Any]]  # usable ones: bbox, category_id, segmentation


def _usable(annotation: Dict[str, Any], height: int, width: int) -> Optional[Dict[str, Any]]:
    """The annotation with its box clipped to the image as xyxy, or None if crowd or degenerate."""
    if annotation.get("iscrowd", 0) or "segmentation" not in annotation:
        return None
    x, y, w, h = annotation["bbox"]
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        return None
    return {"box": [x1, y1, x2, y2], "category_id": annotation["category_id"],
            "segmentation": annotation["segmentation"]}


def _decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """An (H, W) uint8 mask from polygons, uncompressed RLE (counts list) or compressed RLE."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class COCODataset(torch.utils.data.Dataset):
    """One COCO-format dataset; see the module doc.

    ``name`` and ``layout`` only serve error messages (``layout`` describes where the files are
    expected, e.g. ``"under the data root /data: coco/train2014/, coco/annotations/..."``).
    """

    def __init__(self, name: str, img_dir: str, ann_file: str, remove_images_without_annotations: bool,
                 transform: Optional[Callable] = None, layout: str = ""):
        where = f" (expected {layout})" if layout else ""
        if not os.path.isfile(ann_file):
            raise UserError(f"dataset {name}: annotation file {ann_file} not found{where}")
        if not os.path.isdir(img_dir):
            raise UserError(f"dataset {name}: image folder {img_dir} not found{where}")
        self.name = name
        self.img_dir = img_dir
        self.ann_file = ann_file
        self.transform = transform
        coco = load_coco(ann_file)
        category_ids = sorted(coco.getCatIds())
        self.category_names = {c: coco.cats[c]["name"] for c in category_ids}
        self.category_to_contiguous = {c: i + 1 for i, c in enumerate(category_ids)}
        self.contiguous_to_category = {i: c for c, i in self.category_to_contiguous.items()}
        self.records: List[_ImageRecord] = []
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            height, width = int(info["height"]), int(info["width"])
            annotations = [a for a in (_usable(a, height, width) for a in coco.imgToAnns.get(image_id, []))
                           if a is not None]
            if annotations or not remove_images_without_annotations:
                self.records.append(_ImageRecord(image_id, info["file_name"], height, width, annotations))
        if not self.records:
            what = "images with a usable (non-crowd, non-empty) annotation" if remove_images_without_annotations \
                else "images"
            raise UserError(f"dataset {name}: {ann_file} has no {what}")

    def __len__(self) -> int:
        return len(self.records)

    def coco(self) -> "COCO":
        """The pycocotools index of the annotation file (ground truth for COCOeval)."""
        return load_coco(self.ann_file)

    def image_id(self, index: int) -> int:
        return self.records[index].image_id

    def image_size(self, index: int) -> Tuple[int, int]:
        """``(height, width)`` from the annotation file, without reading the image."""
        record = self.records[index]
        return record.height, record.width

    def aspect_ratios(self) -> np.ndarray:
        """Height / width of every image, from the annotation file."""
        return np.array([r.height / r.width for r in self.records], dtype=np.float64)

    def raw_item(self, index: int) -> Tuple[np.ndarray, Target]:
        """The BGR uint8 image and its untransformed target (numpy)."""
        record = self.records[index]
        path = os.path.join(self.img_dir, record.file_name)
        image = load_bgr(path)
        if image.shape[:2] != (record.height, record.width):
            raise UserError(f"image file {path!r} is {image.shape[1]}x{image.shape[0]} pixels but {self.ann_file} "
                            f"says {record.width}x{record.height}")
        annotations = record.annotations
        boxes = np.array([a["box"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.category_to_contiguous[a["category_id"]] for a in annotations], dtype=np.int64)
        masks = np.zeros((len(annotations), record.height, record.width), dtype=np.uint8)
        for k, a in enumerate(annotations):
            masks[k] = _decode_mask(a["segmentation"], record.height, record.width)
        return image, {"boxes": boxes, "labels": labels, "masks": masks}

    def __getitem__(self, item):
        """``item``: an index, or ``(index, augmentation seed)`` from the training batch sampler (a
        bare index gets a fresh random generator)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, target = self.raw_item(index)
        if self.transform is not None:
            image, target = self.transform(image, target, np.random.default_rng(seed))
        return image, target, index
