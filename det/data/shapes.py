"""The embedded detection dataset: procedural COCO-format instance segmentation, written once.

Each image shows 1 to 4 objects of the categories (a prefix of :data:`SHAPES`: circle, square,
triangle, star, ring, cross) with random size, aspect, rotation, colour and fill (solid or
striped), partly overlapping and partly cut by the border, on a background of a colour gradient,
a faint texture and a few random lines, with Gaussian pixel noise. Image heights and widths vary
between 3/4 of ``image_size`` and ``image_size`` (varied aspect ratios for aspect grouping).

Annotations follow the COCO instances format and are exact by construction: every object's
full mask is the pycocotools rasterisation of its polygon (a ring: outer minus inner polygon);
an object not occluded by a later one is stored as that polygon (or, at random, as RLE), an
occluded object or a ring as the compressed RLE of its visible part; ``bbox`` and ``area`` are
pycocotools' box and area of the stored mask. A placement that would leave an earlier object
less than half or fewer than 40 pixels visible is redrawn, so no object is mostly hidden. Category ids are 1, 3, 5, ...
(not contiguous, like COCO's), so the mapping to contiguous labels is exercised.

Every image is a function of ``(seed, split, index)`` only. The files go to
``<cache>/<name>/{train,val}/<index>.png`` and ``<cache>/<name>/annotations/instances_{split}.json``
(the cache is ``$MABN_CACHE`` or ``~/.cache/mabn``, as for the classification data). Writing is
atomic: one process renders into a temporary directory and renames it into place under an
exclusive ``flock``; ``meta.json`` marks a finished dataset and other processes wait and reuse it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from mabn.utils.data import build_once, default_cache_dir

__all__ = ["IMAGE_SIZE", "SHAPES", "VERSION", "ShapesFolder", "category_id", "dataset_name", "default_cache_dir",
           "ensure_shapes_dataset", "render_image"]

VERSION = 2
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
_SPLIT_IDS = {"train": 0, "val": 1}
_MIN_VISIBLE_FRACTION = 0.5
_MIN_AREA = 40
_PLACEMENT_TRIES = 30
IMAGE_SIZE = 96
"""The default longest image side: sides of 72 to 96 pixels keep the tiny detectors cheap on a CPU."""


class ShapesFolder:
    """Where a generated dataset lives: its root, and per split the image folder and annotation file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def img_dir(self, split: str) -> Path:
        return self.root / split

    def ann_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"


def dataset_name(seed: int, categories: int, train_images: int, val_images: int, image_size: int) -> str:
    return (f"shapes-coco-v{VERSION}-seed{seed}-c{categories}-train{train_images}-val{val_images}"
            f"-px{image_size}")


def category_id(index: int) -> int:
    """The COCO category id of ``SHAPES[index]``: 1, 3, 5, ... (deliberately not contiguous)."""
    return 2 * index + 1


def _rasterize(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pycocotools rasterisation (H, W) bool of one (K, 2) polygon."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon.reshape(-1).tolist()], height, width))
    return mask_utils.decode(rle).astype(bool)


def _outline(rng: np.random.Generator, kind: str, center: Tuple[float, float],
             radius: float) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The outer polygon of a ``kind`` object and, for a ring, the inner one (coordinates rounded to
    0.01 so that the JSON text rasterises to the same mask)."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    aspect = rng.uniform(0.7, 1.0)
    if kind in ("circle", "ring"):
        t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
        points = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif kind == "square":
        half = radius / math.sqrt(2.0) * 1.05
        points = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    elif kind == "triangle":
        t = np.array([-0.5, 1.0 / 6.0, 5.0 / 6.0]) * math.pi
        points = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif kind == "star":
        t = -0.5 * math.pi + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        points = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
    else:  # cross
        a, r = radius * 0.33, radius
        points = np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a], [a, r], [-a, r], [-a, a],
                           [-r, a], [-r, -a], [-a, -a]])
    points = points * np.array([1.0, aspect])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = np.array(center)
    outer = np.round(points @ rotation.T + shift, 2)
    inner = np.round(points * rng.uniform(0.45, 0.6) @ rotation.T + shift, 2) if kind == "ring" else None
    return outer, inner


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(15.0, 240.0, size=3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient between two colours, a faint texture and a few random lines (H, W, 3) float."""
    first, second = _random_color(rng), _random_color(rng)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xx * math.cos(theta) + yy * math.sin(theta)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = first + (second - first) * ramp[..., None]
    period = rng.uniform(5.0, 14.0)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    kind = rng.integers(3)
    if kind == 0:
        pattern = np.sin(2.0 * math.pi * (xx * math.sin(theta) - yy * math.cos(theta)) / period + phase)
    elif kind == 1:
        pattern = np.sign(np.sin(math.pi * xx / period + phase) * np.sin(math.pi * yy / period))
    else:
        pattern = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), period / 3)
        pattern /= max(float(np.abs(pattern).max()), 1e-6)
    image += rng.uniform(8.0, 25.0) * pattern[..., None]
    for _ in range(rng.integers(0, 4)):
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p1, p2, tuple(float(c) for c in _random_color(rng)), int(rng.integers(1, 3)), cv2.LINE_AA)
    return image


def _fill(rng: np.random.Generator, height: int, width: int, avoid: np.ndarray) -> np.ndarray:
    """An object's fill (H, W, 3) float: a colour far from ``avoid``, solid or striped."""
    color = _random_color(rng)
    for _ in range(10):
        if np.abs(color - avoid).sum() > 120.0:
            break
        color = _random_color(rng)
    fill = np.broadcast_to(color, (height, width, 3)).astype(np.float32)
    if rng.random() < 0.4:
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = rng.uniform(0.0, math.pi)
        stripes = np.sin(2.0 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / rng.uniform(3.0, 7.0)) > 0
        other = np.clip(color + rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 80.0), 0.0, 255.0)
        fill = np.where(stripes[..., None], other, fill).astype(np.float32)
    return fill


def _place_objects(rng: np.random.Generator, categories: int, height: int,
                   width: int) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """Objects bottom to top as ``(category index, outer polygon, full mask)``; see the module doc."""
    objects: List[Tuple[int, np.ndarray, np.ndarray]] = []
    short = min(height, width)
    for _ in range(rng.integers(1, 5)):
        for _ in range(_PLACEMENT_TRIES):
            k = int(rng.integers(categories))
            radius = rng.uniform(0.13, 0.32) * short
            center = (rng.uniform(0.3 * radius, width - 0.3 * radius),
                      rng.uniform(0.3 * radius, height - 0.3 * radius))
            outer, inner = _outline(rng, SHAPES[k], center, radius)
            mask = _rasterize(outer, height, width)
            if inner is not None:
                mask &= ~_rasterize(inner, height, width)
            if mask.sum() < _MIN_AREA:
                continue
            if all((m & ~mask).sum() >= max(_MIN_VISIBLE_FRACTION * m.sum(), _MIN_AREA) for _, _, m in objects):
                objects.append((k, outer, mask))
                break
    return objects


def _render(seed: int, split: str, index: int, categories: int,
            image_size: int) -> Tuple[np.ndarray, List[Dict]]:
    rng = np.random.default_rng([VERSION, seed, _SPLIT_IDS[split], index])
    height = int(rng.integers(image_size * 3 // 4, image_size + 1))
    width = int(rng.integers(image_size * 3 // 4, image_size + 1))
    image = _background(rng, height, width)
    objects = _place_objects(rng, categories, height, width)
    for _, _, mask in objects:
        avoid = image[mask].mean(axis=0)
        image = np.where(mask[..., None], _fill(rng, height, width, avoid), image)
    image += rng.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    annotations = []
    for position, (k, outer, mask) in enumerate(objects):
        visible = mask.copy()
        for _, _, above in objects[position + 1:]:
            visible &= ~above
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        as_polygon = SHAPES[k] != "ring" and bool((visible == mask).all()) and rng.random() < 0.7
        if as_polygon:
            segmentation = [[float(v) for v in outer.reshape(-1)]]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append({"category_id": category_id(k), "segmentation": segmentation, "iscrowd": 0,
                            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                            "area": float(mask_utils.area(rle))})
    return image, annotations


def render_image(seed: int, split: str, index: int, categories: int = 3,
                 image_size: int = IMAGE_SIZE) -> Tuple[np.ndarray, List[Dict]]:
    """Image ``index`` of ``split`` as BGR uint8 (H, W, 3) and its annotations (COCO dicts
    without ``id`` / ``image_id``)."""
    if not 1 <= categories <= len(SHAPES):
        raise ValueError(f"categories must lie in 1..{len(SHAPES)}, got {categories}")
    return _render(seed, split, index, categories, image_size)


def _write(root: Path, seed: int, categories: int, counts: Dict[str, int], image_size: int) -> None:
    (root / "annotations").mkdir(parents=True)
    category_list = [{"id": category_id(k), "name": SHAPES[k], "supercategory": "shape"}
                     for k in range(categories)]
    for split, count in counts.items():
        (root / split).mkdir()
        images, annotations = [], []
        for index in range(count):
            image, objects = _render(seed, split, index, categories, image_size)
            file_name = f"{index:06d}.png"
            ok, encoded = cv2.imencode(".png", image)
            if not ok:
                raise RuntimeError(f"PNG encoding failed for {root / split / file_name}")
            (root / split / file_name).write_bytes(encoded.tobytes())
            images.append({"id": index + 1, "file_name": file_name, "height": image.shape[0],
                           "width": image.shape[1]})
            for annotation in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **annotation})
        content = {"info": {"description": f"MABN embedded shapes ({split})", "version": VERSION},
                   "licenses": [], "images": images, "annotations": annotations, "categories": category_list}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    meta = {"version": VERSION, "seed": seed, "categories": categories, "image_size": image_size, **counts}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def ensure_shapes_dataset(cache_dir: Optional[os.PathLike] = None, seed: int = 0, categories: int = 3,
                          train_images: int = 480, val_images: int = 80, image_size: int = IMAGE_SIZE,
                          log: Callable[[str], None] = print) -> ShapesFolder:
    """The generated dataset, written first if no process has yet (safe from every rank at once)."""
    if not 1 <= categories <= len(SHAPES):
        raise ValueError(f"categories must lie in 1..{len(SHAPES)}, got {categories}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / dataset_name(seed, categories, train_images, val_images, image_size)
    counts = {"train": train_images, "val": val_images}
    return ShapesFolder(build_once(
        target, lambda folder: _write(folder, seed, categories, counts, image_size),
        f"the embedded shapes dataset ({categories} categories, {train_images}+{val_images} images of up to "
        f"{image_size} px)", log))
