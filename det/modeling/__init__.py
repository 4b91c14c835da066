"""Mask R-CNN R-FPN with pluggable norms, built on ``torchvision.models.detection``."""
from det.modeling.detector import build_detection_model

__all__ = ["build_detection_model"]
