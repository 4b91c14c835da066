"""Run a trained detector on single images: ``Predictor(cfg, weights).predict(image_bgr)``.

The image is an HxWx3 uint8 array in OpenCV's BGR order (``cv2.imread``); the result holds
numpy arrays in the image's own coordinates: ``boxes`` (N, 4) x1, y1, x2, y2, ``labels`` (N,)
contiguous class ids (0 is background, so 1..NUM_CLASSES-1), ``scores`` (N,) and ``masks``
(N, H, W) booleans (mask probability >= ``mask_threshold``).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from yacs.config import CfgNode

from det.modeling import build_detection_model, load_weights
from mabn.utils.distributed import resolve_device as _resolve_device
from mabn.utils.errors import UserError

__all__ = ["Predictor", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``MODEL.DEVICE``: "cpu", "cuda[:k]", or "auto" (CUDA when available)."""
    return _resolve_device(name, "MODEL.DEVICE")


class Predictor:
    """A detector in eval mode with complete weights, for one image at a time."""

    def __init__(self, cfg: CfgNode, weights: Optional[str] = None, mask_threshold: float = 0.5) -> None:
        path = weights or cfg.MODEL.WEIGHT
        if not path:
            raise UserError("no weights: pass a detection checkpoint (--ckpt or MODEL.WEIGHT)")
        self.device = resolve_device(cfg.MODEL.DEVICE)
        self.model = build_detection_model(cfg)
        report = load_weights(self.model, path)
        if report.missing:
            raise UserError(f"{path} does not hold a whole detector for this config ({report.summary()}); "
                            f"pass a detection checkpoint trained with this config")
        self.report = report
        self.model.eval().to(self.device)
        self.mask_threshold = mask_threshold

    @torch.inference_mode()
    def predict(self, image_bgr: np.ndarray) -> Dict[str, np.ndarray]:
        if not (isinstance(image_bgr, np.ndarray) and image_bgr.ndim == 3 and image_bgr.shape[2] == 3
                and image_bgr.dtype == np.uint8):
            got = f"{image_bgr.dtype} array of shape {image_bgr.shape}" if isinstance(image_bgr, np.ndarray) \
                else type(image_bgr).__name__
            raise UserError(f"predict expects an HxWx3 uint8 BGR image (cv2.imread), got a {got}")
        rgb = torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1])).permute(2, 0, 1)
        output = self.model([rgb.to(self.device, torch.float32) / 255.0])[0]
        result = {key: output[key].cpu().numpy() for key in ("boxes", "labels", "scores")}
        if "masks" in output:
            result["masks"] = (output["masks"][:, 0] >= self.mask_threshold).cpu().numpy()
        else:
            result["masks"] = np.zeros((0,) + image_bgr.shape[:2], dtype=bool)
        return result
