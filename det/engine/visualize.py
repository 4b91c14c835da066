"""Draw detections (masks, boxes, class names and scores) onto a BGR image with OpenCV."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["COCO_CLASS_NAMES", "class_names_for", "draw_detections"]

COCO_CLASS_NAMES = (
    "__background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
"""The 80 COCO categories in the contiguous order of maskrcnn-benchmark (index 0: background)."""


def class_names_for(num_classes: int) -> Sequence[str]:
    """COCO names for an 81-class model, otherwise "class <k>"."""
    if num_classes == len(COCO_CLASS_NAMES):
        return COCO_CLASS_NAMES
    return ["__background"] + [f"class {k}" for k in range(1, num_classes)]


def _color(label: int) -> tuple:
    """A distinct, stable BGR colour per class."""
    rng = np.random.default_rng(label * 7919 + 17)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def draw_detections(image_bgr: np.ndarray, detections: Dict[str, np.ndarray], class_names: Sequence[str],
                    score_threshold: float = 0.5, mask_alpha: float = 0.45) -> np.ndarray:
    """A copy of ``image_bgr`` with the detections scoring at least ``score_threshold``: masks
    blended in the class colour, boxes, and "name score" labels."""
    import cv2

    canvas = image_bgr.copy()
    keep = np.flatnonzero(detections["scores"] >= score_threshold)
    masks: Optional[np.ndarray] = detections.get("masks")
    for index in keep[::-1]:  # highest score drawn last, on top
        label = int(detections["labels"][index])
        color = _color(label)
        if masks is not None and len(masks) > index:
            region = masks[index].astype(bool)
            canvas[region] = (canvas[region] * (1 - mask_alpha) + np.array(color) * mask_alpha).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(float(v))) for v in detections["boxes"][index])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        name = class_names[label] if label < len(class_names) else f"class {label}"
        text = f"{name} {float(detections['scores'][index]):.2f}"
        (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        top = max(y1 - height - baseline - 2, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + width + 2, top + height + baseline + 2), color, -1)
        cv2.putText(canvas, text, (x1 + 1, top + height + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas
