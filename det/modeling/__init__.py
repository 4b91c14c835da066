"""Mask R-CNN R-FPN with pluggable norms, built on ``torchvision.models.detection``."""
from det.modeling.detector import build_detection_model
from det.modeling.weights import WeightReport, load_weights

__all__ = ["WeightReport", "build_detection_model", "load_weights"]
