"""Which of maskrcnn-benchmark's models this project builds, and one-line refusals for the others.

``det`` builds GeneralizedRCNN Faster and Mask R-CNN: a ResNet/ResNeXt-FPN body, an RPN and FPN
RoI heads. maskrcnn-benchmark's other models (C4/C5 bodies, RetinaNet, keypoints, FBNet,
deformable convolutions, test-time augmentation, ...) are refused when a config file describes one:
by their keys (:data:`UNSUPPORTED_KEYS`, which the defaults do not have) and by the values of
shared keys (:func:`check_architecture`). Both messages are one line that ends with
:data:`SUPPORTED`. The model builder runs :func:`check_architecture` too, for configs built from
the defaults and command-line options only.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

from yacs.config import CfgNode

from mabn.utils.errors import UserError

__all__ = ["FPN_BODY", "RENAMED_KEYS", "SUPPORTED", "UNSUPPORTED_KEYS", "check_architecture", "unsupported_key"]

SUPPORTED = ("this project builds GeneralizedRCNN Faster/Mask R-CNN (MODEL.MASK_ON) with an RPN and FPN RoI heads "
             "on an R-{18,34,50,101,152}-FPN body (ResNeXt through MODEL.RESNETS.NUM_GROUPS / WIDTH_PER_GROUP)")
"""The end of every refusal."""

FPN_BODY = re.compile(r"R-(\d+)-FPN(?:-([A-Za-z]+))?")
"""The CONV_BODY names that are built: depth and optional norm suffix."""

UNSUPPORTED_KEYS: Dict[str, str] = {
    "MODEL.RETINANET_ON": "RetinaNet",
    "MODEL.RETINANET": "RetinaNet",
    "MODEL.KEYPOINT_ON": "keypoint R-CNN",
    "MODEL.ROI_KEYPOINT_HEAD": "keypoint R-CNN",
    "MODEL.FBNET": "FBNet",
    "MODEL.RESNETS.STAGE_WITH_DCN": "deformable convolutions",
    "MODEL.RESNETS.WITH_MODULATED_DCN": "deformable convolutions",
    "MODEL.RESNETS.DEFORMABLE_GROUPS": "deformable convolutions",
    "MODEL.RESNETS.RES5_DILATION": "the C4/C5 res5 head (dilated res5)",
    "MODEL.CLS_AGNOSTIC_BBOX_REG": "class-agnostic box regression",
    "MODEL.ROI_MASK_HEAD.POSTPROCESS_MASKS": "mask pasting inside the model",
    "MODEL.ROI_MASK_HEAD.POSTPROCESS_MASKS_THRESHOLD": "mask pasting inside the model",
    "TEST.BBOX_AUG": "test-time augmentation",
    "INPUT.BRIGHTNESS": "colour-jitter augmentation",
    "INPUT.CONTRAST": "colour-jitter augmentation",
    "INPUT.SATURATION": "colour-jitter augmentation",
    "INPUT.HUE": "colour-jitter augmentation",
    "INPUT.VERTICAL_FLIP_PROB_TRAIN": "vertical-flip augmentation",
}
"""Keys (or sections) of maskrcnn-benchmark's defaults for features this project does not have."""

RENAMED_KEYS: Dict[str, str] = {
    "MODEL.BACKBONE.OUT_CHANNELS": "MODEL.RESNETS.BACKBONE_OUT_CHANNELS",
}
"""Keys of older maskrcnn-benchmark versions -> the name in the defaults (and here)."""


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def unsupported_key(key: str, where: str = "") -> Optional[UserError]:
    """The refusal for ``key`` (dotted) if it belongs to a feature that is not built, else None."""
    feature = UNSUPPORTED_KEYS.get(key)
    if feature is None:
        return None
    return UserError(f"{_prefix(where)}{key} belongs to maskrcnn-benchmark's {feature}, which is not available; "
                     f"{SUPPORTED}")


def _refuse(what: str, where: str, hint: str = "") -> UserError:
    return UserError(f"{_prefix(where)}{what} is not available{f' ({hint})' if hint else ''}; {SUPPORTED}")


def check_architecture(cfg: CfgNode, where: str = "") -> None:
    """Refuse, in one line naming what is supported, a config whose model is not built here
    (``where``: the file, as the start of the message)."""
    model = cfg.MODEL
    if model.META_ARCHITECTURE != "GeneralizedRCNN":
        raise _refuse(f"MODEL.META_ARCHITECTURE {model.META_ARCHITECTURE!r}", where)
    if model.RPN_ONLY:
        raise _refuse("an RPN-only model (MODEL.RPN_ONLY True)", where)
    body = model.BACKBONE.CONV_BODY
    match = FPN_BODY.fullmatch(body)
    if match is None or (match.group(2) or "").upper() == "RETINANET":
        kind = ("a C4/C5 body" if re.fullmatch(r"R-\d+-C[45]", body) else
                "the RetinaNet body" if match is not None else "this body")
        raise _refuse(f"{kind} (MODEL.BACKBONE.CONV_BODY {body!r})", where)
    if not (model.RPN.USE_FPN and model.ROI_HEADS.USE_FPN):
        raise _refuse("a model without FPN (MODEL.RPN.USE_FPN / MODEL.ROI_HEADS.USE_FPN False)", where)
    if model.RPN.RPN_HEAD != "SingleConvRPNHead":
        raise _refuse(f"MODEL.RPN.RPN_HEAD {model.RPN.RPN_HEAD!r}", where, "the RPN head is 'SingleConvRPNHead'")
    for head in ("ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        extractor = model[head].FEATURE_EXTRACTOR
        if head == "ROI_MASK_HEAD" and not model.MASK_ON:
            continue
        if extractor.startswith("ResNet50Conv5"):
            raise _refuse(f"the C4 RoI head (MODEL.{head}.FEATURE_EXTRACTOR {extractor!r})", where)
    if model.ROI_BOX_HEAD.PREDICTOR != "FPNPredictor":
        predictor = model.ROI_BOX_HEAD.PREDICTOR
        detail = ", the C4 predictor that average-pools a res5 map," if predictor == "FastRCNNPredictor" else ""
        raise _refuse(f"MODEL.ROI_BOX_HEAD.PREDICTOR {predictor!r}{detail}", where, "FPN heads take 'FPNPredictor'")
