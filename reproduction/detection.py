"""The detection miniature: tiny Mask R-CNN configs on the embedded COCO-format shapes data.

``det/tools/train_net.py`` trains a ``configs/det/shapes/mask_rcnn_<norm>_tiny.yaml`` config with
2 images per process (SyncBN: 2 processes, 4 images in all) for the config's own schedule (or that
schedule scaled to another length), then ``det/tools/test_net.py`` evaluates the last checkpoint
on the validation images (COCO box and mask AP). :func:`draw_predictions` runs det's
``Predictor`` on a few validation images and draws masks, boxes and class names with det's
``draw_detections``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from reproduction.schedules import BRN_SCHEDULE, scale_schedule

__all__ = ["DET_EVAL_SECONDS", "DET_NORMS", "DET_SECONDS_PER_ITER", "REPO_ROOT", "TinySchedule", "config_file",
           "det_tools_available", "det_opts", "det_commands", "norm_schedule", "read_coco_results", "draw_predictions",
           "tiny_schedule"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DET_NORMS = ("bn", "brn", "mabn", "syncbn")
IMAGES_PER_PROCESS = 2
DET_SECONDS_PER_ITER = 0.3
"""Seconds per training iteration of a tiny config at one thread, start-up included: the CPU time
of MABN's 1000-iteration ``train_net`` run (295 s; BN: 247 s) over its iterations (docs/det.md),
for the time estimates."""
DET_EVAL_SECONDS = 15.0
"""Wall seconds of ``test_net`` on the 80 validation images at one thread, start-up included
(11 s for MABN, 15 s for BN; docs/det.md)."""


class TinySchedule(NamedTuple):
    """A tiny config's learning-rate schedule: run length, LR steps, LR warm-up iterations."""

    max_iter: int
    steps: Tuple[int, ...]
    warmup_iters: int


def tiny_schedule(norm: str) -> TinySchedule:
    """The schedule written in ``configs/det/shapes/mask_rcnn_<norm>_tiny.yaml``."""
    from det.config import load_config

    solver = load_config(str(config_file(norm))).SOLVER
    return TinySchedule(solver.MAX_ITER, tuple(solver.STEPS), solver.WARMUP_ITERS)


def _tool(name: str) -> Path:
    return REPO_ROOT / "det" / "tools" / f"{name}.py"


def config_file(norm: str) -> Path:
    return REPO_ROOT / "configs" / "det" / "shapes" / f"mask_rcnn_{norm}_tiny.yaml"


def det_tools_available() -> Optional[str]:
    """None when det's tools and tiny configs are present, else why not (one line)."""
    missing = [str(p.relative_to(REPO_ROOT)) for p in (_tool("train_net"), _tool("test_net"), config_file("mabn"))
               if not p.is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        import det.engine.predictor  # noqa: F401  (the drawing step needs it)
        import det.engine.visualize  # noqa: F401
    except ImportError as exc:
        return f"det cannot be imported ({exc})"
    return None


def det_opts(norm: str, iterations: int, output_dir: str, processes: int = 1) -> List[str]:
    """KEY VALUE overrides: the config's LR schedule scaled to ``iterations`` (unchanged at its own
    length), BRN's published schedule scaled alike. MABN keeps the config's warm-ups: they count
    iterations against its window of ``REAL_B / B`` iterations, not fractions of the run."""
    schedule = tiny_schedule(norm)
    steps = ",".join(str(max(1, round(step * iterations / schedule.max_iter))) for step in schedule.steps)
    warmup = max(1, round(schedule.warmup_iters * iterations / schedule.max_iter))
    images = str(IMAGES_PER_PROCESS * processes)
    opts = ["SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", f"({steps},)", "SOLVER.WARMUP_ITERS", str(warmup),
            "SOLVER.CHECKPOINT_PERIOD", str(iterations), "SOLVER.IMS_PER_BATCH", images, "TEST.IMS_PER_BATCH", images,
            "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", output_dir]
    if norm == "brn":
        brn = scale_schedule(BRN_SCHEDULE, iterations)
        opts += ["MODEL.BRN.WARMUP_ITERS", str(brn["warmup"]), "MODEL.BRN.R_RAMP_END", str(brn["r_ramp_end"]),
                 "MODEL.BRN.D_RAMP_END", str(brn["d_ramp_end"])]
    return opts


def norm_schedule(norm: str, iterations: int) -> Dict[str, int]:
    """The BRN or MABN schedule keys a run of ``iterations`` trains with (empty for other norms);
    MABN's R_WARMUP_ITERS as the layer resolves it (the config's -1 means a default)."""
    from det.config import load_config
    from det.modeling.norms import norm_spec

    cfg = load_config(str(config_file(norm)), det_opts(norm, iterations, "."))
    if norm == "brn":
        return {"WARMUP_ITERS": cfg.MODEL.BRN.WARMUP_ITERS, "R_RAMP_END": cfg.MODEL.BRN.R_RAMP_END,
                "D_RAMP_END": cfg.MODEL.BRN.D_RAMP_END}
    if norm == "mabn":
        layer = norm_spec("MABN", cfg).layer(1)
        return {"WARMUP_ITERS": layer.warmup_iters, "R_WARMUP_ITERS": layer.r_warmup_iters}
    return {}


def det_commands(norm: str, iterations: int, output_dir: str) -> List[List[str]]:
    """Train (no evaluation inside), then evaluate the last checkpoint with test_net."""
    processes = 2 if norm == "syncbn" else 1
    opts = det_opts(norm, iterations, output_dir, processes)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    config = ["--config-file", str(config_file(norm))]
    return [launcher + [str(_tool("train_net")), "--skip-test", *config, *opts],
            launcher + [str(_tool("test_net")), *config, *opts]]


def read_coco_results(output_dir: str) -> Optional[Dict[str, Dict[str, float]]]:
    """``{"bbox": {"AP": ..., ...}, "segm": {...}}`` in percent, from test_net's ``coco_results.json``."""
    path = os.path.join(output_dir, "inference", "shapes_val", "coco_results.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        metrics = json.load(handle)
    return {iou_type: {name: 100.0 * value for name, value in values.items()} for iou_type, values in metrics.items()}


MAX_DRAWN = 8   # highest-scoring detections drawn per image
DRAW_SCALE = 4  # the 96-pixel images are enlarged so that the labels stay readable


def _top(detections: Dict[str, "np.ndarray"], count: int) -> Dict[str, "np.ndarray"]:
    order = detections["scores"].argsort()[::-1][:count]
    return {key: value[order] for key, value in detections.items()}


def _enlarged(image: "np.ndarray", detections: Dict[str, "np.ndarray"], scale: int):
    """``image`` and its detections ``scale`` times larger (nearest neighbour)."""
    import cv2
    import numpy as np

    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    masks = detections["masks"]
    scaled = dict(detections, boxes=detections["boxes"] * scale,
                  masks=np.repeat(np.repeat(masks, scale, axis=1), scale, axis=2) if masks.size else masks)
    return big, scaled


def draw_predictions(norm: str, iterations: int, output_dir: str, path: str, images: int = 4,
                     thresholds: Sequence[float] = (0.5, 0.3, 0.1)) -> Dict[str, object]:
    """Predict on the first ``images`` validation images and write them side by side to ``path``.

    Detections scoring at least the first of ``thresholds`` that leaves any are drawn (a briefly
    trained model may score nothing at 0.5); the threshold used is returned.
    """
    import cv2
    import numpy as np

    from det.config import load_config
    from det.data.shapes import SHAPES, ensure_shapes_dataset
    from det.engine.checkpoint import find_last_checkpoint
    from det.engine.predictor import Predictor
    from det.engine.visualize import draw_detections

    cfg = load_config(str(config_file(norm)), det_opts(norm, iterations, output_dir))
    weights = find_last_checkpoint(output_dir)
    if weights is None:
        raise FileNotFoundError(f"no checkpoint in {output_dir}")
    predictor = Predictor(cfg, weights)
    names = ["__background"] + list(SHAPES[:cfg.MODEL.ROI_BOX_HEAD.NUM_CLASSES - 1])
    folder = ensure_shapes_dataset(log=lambda message: None).img_dir("val")
    files = sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name))[:images]
    loaded = [cv2.imread(str(file), cv2.IMREAD_COLOR) for file in files]
    predictions = [_top(predictor.predict(image), MAX_DRAWN) for image in loaded]
    score_threshold = next((t for t in thresholds if any((p["scores"] >= t).any() for p in predictions)),
                           thresholds[0])
    counts = [int((p["scores"] >= score_threshold).sum()) for p in predictions]
    drawn = [draw_detections(*_enlarged(image, p, DRAW_SCALE), names, score_threshold)
             for image, p in zip(loaded, predictions)]
    height = max(image.shape[0] for image in drawn)
    padded = [cv2.copyMakeBorder(image, 0, height - image.shape[0], 0, 8, cv2.BORDER_CONSTANT, value=(255, 255, 255))
              for image in drawn]
    tiled = np.concatenate(padded, axis=1)
    if not cv2.imwrite(path, tiled):
        raise OSError(f"could not write {path}")
    return {"images": [f.name for f in files], "drawn_detections": counts, "score_threshold": score_threshold,
            "weights": os.path.relpath(weights, os.path.dirname(path))}
