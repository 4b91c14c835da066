"""The embedded dataset: procedural classification images written once as an ImageFolder.

Sixteen classes are the pairs (fill texture, shape) of four textures (solid, stripes, checker,
dots) and four shapes (circle, square, triangle, cross). An image shows one target object of its
class on a background gradient with a faint texture of a random kind, then Gaussian pixel noise.
Colours, contrast, size, aspect, rotation, position and texture period are random, within the
ranges of a :class:`Difficulty`:

* ``hard`` (the default): also random lines and up to two smaller distractor objects of random
  classes, the target at any rotation. Telling the texture apart needs figure-ground
  segregation and the random-resized crops of training often cut the target off: ResNet-20
  does not saturate it within a few thousand iterations.
* ``easy``: one large, high-contrast target, upright within 15 degrees, no lines or
  distractors, little noise. ResNet-8 at 24 px learns it within a thousand iterations
  (the miniature reproduction's classification regime, ``reproduction.classification``).

Every image is a function of ``(seed, split, class, index)`` and the difficulty only (its own
``numpy.random.Generator``), so the dataset is the same on every machine and run. It is written
as PNG files to ``<cache>/<name>/{train,val}/<class>/<index>.png`` (``<name>``:
:func:`dataset_name`, which names every parameter) and read back through the
ImageFolder path used for ImageNet. Writing is atomic: the writer renders into a temporary
directory next to the target and renames it into place, holding an exclusive ``flock`` on a
lock file meanwhile, so concurrent processes (all ranks of a launch, several launches) wait for
one writer and never see a partial dataset.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from mabn.utils.data import build_once, default_cache_dir

__all__ = ["CLASS_NAMES", "DEFAULT_DIFFICULTY", "DIFFICULTIES", "VERSION", "Difficulty", "default_cache_dir",
           "dataset_name", "ensure_embedded_dataset", "render_image", "write_embedded_dataset"]

VERSION = 2
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "checker", "dots")
CLASS_NAMES = tuple(f"{k:02d}_{TEXTURES[k // len(SHAPES)]}_{SHAPES[k % len(SHAPES)]}"
                    for k in range(len(SHAPES) * len(TEXTURES)))
_SPLIT_IDS = {"train": 0, "val": 1}
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class Difficulty:
    """The random ranges of one level of difficulty. The target's radius is a fraction of the
    image side; an object's centre keeps ``object_margin`` x its radius from the border; rotations
    are in radians; contrasts and the noise's standard deviation in 0-255 grey levels; lines and
    distractors are counts (both ends included)."""

    target_radius: Tuple[float, float]
    object_margin: float
    object_rotation: Tuple[float, float]
    object_contrast: Tuple[float, float]
    background_contrast: Tuple[float, float]
    lines: Tuple[int, int]
    distractors: Tuple[int, int]
    noise: Tuple[float, float]


DIFFICULTIES: Dict[str, Difficulty] = {
    # Distractors, lines, a textured background and strong noise: figure-ground segregation first.
    "hard": Difficulty(target_radius=(0.26, 0.40), object_margin=0.6, object_rotation=(0.0, 2.0 * math.pi),
                       object_contrast=(50.0, 120.0), background_contrast=(8.0, 25.0), lines=(1, 4),
                       distractors=(0, 2), noise=(3.0, 14.0)),
    # One large, high-contrast, upright target on a faintly textured gradient: texture and shape only.
    "easy": Difficulty(target_radius=(0.32, 0.44), object_margin=0.9, object_rotation=(-math.pi / 12, math.pi / 12),
                       object_contrast=(80.0, 140.0), background_contrast=(0.0, 6.0), lines=(0, 0),
                       distractors=(0, 0), noise=(2.0, 6.0)),
}
DEFAULT_DIFFICULTY = "hard"


def _difficulty(name: str) -> Difficulty:
    if name not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {name!r}")
    return DIFFICULTIES[name]


def dataset_name(seed: int, classes: int, train_per_class: int, val_per_class: int, size: int,
                 difficulty: str = DEFAULT_DIFFICULTY) -> str:
    """The cache folder's name: every parameter that changes the images (``hard`` adds no suffix)."""
    suffix = "" if difficulty == DEFAULT_DIFFICULTY else f"-{difficulty}"
    return (f"embedded-shapes-v{VERSION}-seed{seed}-c{classes}-train{train_per_class}-val{val_per_class}"
            f"-px{size}{suffix}")


def _texture(rng: np.random.Generator, kind: str, shape: Tuple[int, int], color: np.ndarray,
             contrast: float) -> np.ndarray:
    """An (H, W, 3) float image of the texture ``kind`` around ``color``."""
    h, w = shape
    if kind == "solid":
        return np.broadcast_to(color, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0.0, math.pi)
    period = rng.uniform(4.0, 7.0) * _SUPERSAMPLE
    u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0.0, period)
    v = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0.0, period)
    if kind == "stripes":
        pattern = (np.sin(2.0 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "checker":
        pattern = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:  # dots
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        pattern = (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    other = np.clip(color + sign * contrast, 0.0, 255.0)
    return color + (other - color) * pattern[..., None]


def _shape_mask(rng: np.random.Generator, kind: str, canvas: int, center: Tuple[float, float],
                radius: float, rotation: Tuple[float, float]) -> np.ndarray:
    """A (canvas, canvas) float mask in [0, 1] of the shape ``kind``."""
    mask = np.zeros((canvas, canvas), np.uint8)
    cx, cy = center
    angle = rng.uniform(*rotation)
    aspect = rng.uniform(0.75, 1.0)
    if kind == "circle":
        axes = (max(1, int(round(radius))), max(1, int(round(radius * aspect))))
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), axes, math.degrees(angle), 0, 360, 255, -1, cv2.LINE_AA)
        return mask.astype(np.float32) / 255.0
    if kind == "square":
        half = radius / math.sqrt(2.0) * 1.1
        points = np.array([[-half, -half * aspect], [half, -half * aspect], [half, half * aspect],
                           [-half, half * aspect]])
    elif kind == "triangle":
        points = np.array([[radius * math.cos(a), radius * math.sin(a) * aspect]
                           for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    else:  # cross
        arm = radius * 0.32
        r = radius
        points = np.array([[-arm, -r], [arm, -r], [arm, -arm], [r, -arm], [r, arm], [arm, arm],
                           [arm, r], [-arm, r], [-arm, arm], [-r, arm], [-r, -arm], [-arm, -arm]])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygon = points @ rotation.T + np.array([cx, cy])
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20.0, 235.0, size=3).astype(np.float32)


def _draw_object(rng: np.random.Generator, image: np.ndarray, class_index: int, radius: float,
                 level: Difficulty) -> None:
    canvas = image.shape[0]
    margin = radius * level.object_margin
    center = (rng.uniform(margin, canvas - margin), rng.uniform(margin, canvas - margin))
    texture = TEXTURES[class_index // len(SHAPES)]
    shape = SHAPES[class_index % len(SHAPES)]
    mask = _shape_mask(rng, shape, canvas, center, radius, level.object_rotation)[..., None]
    fill = _texture(rng, texture, image.shape[:2], _random_color(rng), rng.uniform(*level.object_contrast))
    image *= 1.0 - mask
    image += fill * mask


def render_image(seed: int, split: str, class_index: int, index: int, size: int = 40,
                 difficulty: str = DEFAULT_DIFFICULTY) -> np.ndarray:
    """The BGR uint8 (size, size, 3) image number ``index`` of ``class_index`` in ``split``."""
    level = _difficulty(difficulty)
    rng = np.random.default_rng([VERSION, seed, _SPLIT_IDS[split], class_index, index])
    canvas = size * _SUPERSAMPLE
    # Background: a gradient between two colours, a faint texture of any kind, random lines.
    top, bottom = _random_color(rng), _random_color(rng)
    ramp = np.linspace(0.0, 1.0, canvas, dtype=np.float32)[:, None, None]
    image = np.ascontiguousarray(np.broadcast_to(top + (bottom - top) * ramp, (canvas, canvas, 3)))
    if rng.random() < 0.2:
        image = np.ascontiguousarray(np.rot90(image))
    background = _texture(rng, TEXTURES[rng.integers(len(TEXTURES))], (canvas, canvas),
                          np.zeros(3, np.float32), rng.uniform(*level.background_contrast))
    image += background
    for _ in range(rng.integers(level.lines[0], level.lines[1] + 1)):
        p1 = tuple(int(v) for v in rng.integers(0, canvas, size=2))
        p2 = tuple(int(v) for v in rng.integers(0, canvas, size=2))
        color = tuple(float(c) for c in _random_color(rng))
        cv2.line(image, p1, p2, color, int(rng.integers(1, 4)), cv2.LINE_AA)
    # Distractors of random classes, then the target on top.
    for _ in range(rng.integers(level.distractors[0], level.distractors[1] + 1)):
        _draw_object(rng, image, int(rng.integers(len(CLASS_NAMES))), rng.uniform(0.10, 0.18) * canvas, level)
    _draw_object(rng, image, class_index, rng.uniform(*level.target_radius) * canvas, level)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    image += rng.normal(0.0, rng.uniform(*level.noise), size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_embedded_dataset(root: Path, seed: int, classes: int, train_per_class: int,
                           val_per_class: int, size: int, difficulty: str = DEFAULT_DIFFICULTY) -> None:
    """Render every image into ``root/{train,val}/<class>/<index>.png`` (``root`` must not exist)."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k in range(classes):
            folder = root / split / CLASS_NAMES[k]
            folder.mkdir(parents=True)
            for i in range(count):
                ok, encoded = cv2.imencode(".png", render_image(seed, split, k, i, size, difficulty))
                if not ok:
                    raise RuntimeError(f"PNG encoding failed for {folder}/{i:05d}.png")
                (folder / f"{i:05d}.png").write_bytes(encoded.tobytes())
    meta = {"version": VERSION, "seed": seed, "classes": classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "size": size, "difficulty": difficulty,
            "class_names": list(CLASS_NAMES[:classes])}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))


def ensure_embedded_dataset(cache_dir: Optional[os.PathLike] = None, seed: int = 0, classes: int = 16,
                            train_per_class: int = 600, val_per_class: int = 100, size: int = 40,
                            log=print, difficulty: str = DEFAULT_DIFFICULTY) -> Path:
    """Return the dataset directory, writing it first if no process has yet.

    Safe to call from every rank at once (:func:`mabn.utils.data.build_once`): one process renders
    into a temporary directory and renames it into place under an exclusive lock; the others block
    on the lock and then find the finished directory.
    """
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must lie in 2..{len(CLASS_NAMES)}, got {classes}")
    _difficulty(difficulty)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / dataset_name(seed, classes, train_per_class, val_per_class, size, difficulty)
    return build_once(
        target,
        lambda folder: write_embedded_dataset(folder, seed, classes, train_per_class, val_per_class, size, difficulty),
        f"the embedded dataset ({classes} classes x {train_per_class}+{val_per_class} images of {size} px, "
        f"{difficulty})", log)
