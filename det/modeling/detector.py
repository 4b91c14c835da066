"""``build_detection_model(cfg)``: torchvision's Mask R-CNN (or Faster R-CNN) from the yacs config.

Every RPN, RoI, pooler and input number comes from the config; norm layers reach the modules as
``norm_layer`` callables built once from the config's names (:mod:`det.modeling.norms`). The
result is a plain ``torchvision.models.detection.MaskRCNN``: train mode takes ``(images,
targets)`` and returns the loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
``loss_objectness``, ``loss_rpn_box_reg``), eval mode returns per image ``boxes``, ``labels``,
``scores`` and ``masks`` (N, 1, H, W probabilities) in original image coordinates.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from yacs.config import CfgNode

from det.modeling.backbone import ResNetFPNOptions, build_resnet_fpn_backbone
from det.modeling.heads import build_box_head, build_box_predictor, build_mask_head, build_mask_predictor
from det.config.support import check_architecture
from det.modeling.norms import body_spec, box_head_spec, fpn_spec, mask_head_spec
from det.modeling.rpn import BenchmarkRegionProposalNetwork
from det.modeling.transform import DetectionTransform
from mabn.utils.errors import UserError

__all__ = ["build_detection_model", "FPN_STRIDES"]

FPN_STRIDES = (4, 8, 16, 32, 64)
"""Strides of P2..P6, the maps the RPN runs on ('0'..'3' and 'pool')."""

TORCHVISION_RPN_MIN_SIZE = 1e-3
"""torchvision's smallest proposal side: zero-width proposals would give infinite box targets
(torchvision has no +1 pixel convention), so MODEL.RPN.MIN_SIZE 0 means this."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _featmap_names(scales, key: str) -> List[str]:
    """FPN map names ('0'..'3' = P2..P5) for the pooler scales (1/4 .. 1/32)."""
    names = []
    for scale in scales:
        level = -math.log2(scale) if scale > 0 else float("nan")
        _check(level in (2, 3, 4, 5), f"{key} {tuple(scales)}: each scale must be one of 1/4, 1/8, 1/16, 1/32 "
                                      f"(P2..P5), got {scale}")
        names.append(str(int(level) - 2))
    return names


def _check_supported(cfg: CfgNode) -> None:
    check_architecture(cfg)
    model = cfg.MODEL
    _check(tuple(model.RPN.ANCHOR_STRIDE) == FPN_STRIDES,
           f"MODEL.RPN.ANCHOR_STRIDE {tuple(model.RPN.ANCHOR_STRIDE)}: the FPN levels P2..P6 have strides "
           f"{FPN_STRIDES}; set it to {FPN_STRIDES}")
    _check(len(model.RPN.ANCHOR_SIZES) == len(FPN_STRIDES),
           f"MODEL.RPN.ANCHOR_SIZES {tuple(model.RPN.ANCHOR_SIZES)}: one size per FPN level, {len(FPN_STRIDES)} in all")
    _check(model.ROI_BOX_HEAD.DILATION >= 1 and model.ROI_MASK_HEAD.DILATION >= 1,
           "MODEL.ROI_BOX_HEAD.DILATION and MODEL.ROI_MASK_HEAD.DILATION must be >= 1")
    pixels = cfg.INPUT
    _check(len(pixels.PIXEL_MEAN) == 3 and len(pixels.PIXEL_STD) == 3 and all(s > 0 for s in pixels.PIXEL_STD),
           "INPUT.PIXEL_MEAN and INPUT.PIXEL_STD need 3 values each, the stds positive")
    if model.MASK_ON:
        mask = model.ROI_MASK_HEAD
        _check(mask.PREDICTOR == "MaskRCNNC4Predictor",
               f"MODEL.ROI_MASK_HEAD.PREDICTOR {mask.PREDICTOR!r}: use 'MaskRCNNC4Predictor'")
        _check(not mask.SHARE_BOX_FEATURE_EXTRACTOR,
               "MODEL.ROI_MASK_HEAD.SHARE_BOX_FEATURE_EXTRACTOR True is not available with FPN; set it to False")
        _check(mask.RESOLUTION == 2 * mask.POOLER_RESOLUTION,
               f"MODEL.ROI_MASK_HEAD.RESOLUTION {mask.RESOLUTION} must be 2 x POOLER_RESOLUTION "
               f"({2 * mask.POOLER_RESOLUTION}): the predictor upsamples the pooled features by 2")
        _check(len(mask.CONV_LAYERS) > 0, "MODEL.ROI_MASK_HEAD.CONV_LAYERS must name at least one conv")


def _backbone_options(cfg: CfgNode) -> ResNetFPNOptions:
    """The ResNet-FPN backbone as MODEL.RESNETS, MODEL.BACKBONE and MODEL.FPN describe it."""
    model_cfg = cfg.MODEL
    depth, body_norm = body_spec(cfg)
    resnets = model_cfg.RESNETS
    return ResNetFPNOptions(
        depth, body_norm, resnets.BACKBONE_OUT_CHANNELS, stride_in_1x1=resnets.STRIDE_IN_1X1,
        freeze_at=model_cfg.BACKBONE.FREEZE_CONV_BODY_AT, fpn_norm=fpn_spec(cfg), groups=resnets.NUM_GROUPS,
        width_per_group=resnets.WIDTH_PER_GROUP, stem_out_channels=resnets.STEM_OUT_CHANNELS,
        res2_out_channels=resnets.RES2_OUT_CHANNELS, fpn_relu=model_cfg.FPN.USE_RELU)


def _rpn_options(rpn: CfgNode, channels: int) -> Dict[str, Any]:
    """torchvision's ``rpn_*`` constructor arguments from MODEL.RPN: one anchor size per FPN level."""
    anchors = AnchorGenerator(sizes=tuple((int(size),) for size in rpn.ANCHOR_SIZES),
                              aspect_ratios=(tuple(float(r) for r in rpn.ASPECT_RATIOS),) * len(rpn.ANCHOR_SIZES))
    return dict(
        rpn_anchor_generator=anchors, rpn_head=RPNHead(channels, len(rpn.ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOP_N_TRAIN, rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOP_N_TEST,
        rpn_post_nms_top_n_train=rpn.FPN_POST_NMS_TOP_N_TRAIN, rpn_post_nms_top_n_test=rpn.FPN_POST_NMS_TOP_N_TEST,
        rpn_nms_thresh=rpn.NMS_THRESH, rpn_fg_iou_thresh=rpn.FG_IOU_THRESHOLD, rpn_bg_iou_thresh=rpn.BG_IOU_THRESHOLD,
        rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE, rpn_positive_fraction=rpn.POSITIVE_FRACTION)


def _box_options(cfg: CfgNode, channels: int) -> Dict[str, Any]:
    """torchvision's ``box_*`` constructor arguments from MODEL.ROI_BOX_HEAD and MODEL.ROI_HEADS."""
    box = cfg.MODEL.ROI_BOX_HEAD
    roi = cfg.MODEL.ROI_HEADS
    with_convs, box_norm = box_head_spec(cfg)
    box_pooler = MultiScaleRoIAlign(_featmap_names(box.POOLER_SCALES, "MODEL.ROI_BOX_HEAD.POOLER_SCALES"),
                                    box.POOLER_RESOLUTION, box.POOLER_SAMPLING_RATIO)
    box_head = build_box_head(channels, box.POOLER_RESOLUTION, with_convs, box.NUM_STACKED_CONVS, box.CONV_HEAD_DIM,
                              box.MLP_HEAD_DIM, box_norm, box.DILATION)
    return dict(
        box_roi_pool=box_pooler, box_head=box_head,
        box_predictor=build_box_predictor(box.MLP_HEAD_DIM, box.NUM_CLASSES),
        box_score_thresh=roi.SCORE_THRESH, box_nms_thresh=roi.NMS, box_detections_per_img=roi.DETECTIONS_PER_IMG,
        box_fg_iou_thresh=roi.FG_IOU_THRESHOLD, box_bg_iou_thresh=roi.BG_IOU_THRESHOLD,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, box_positive_fraction=roi.POSITIVE_FRACTION,
        bbox_reg_weights=tuple(float(w) for w in roi.BBOX_REG_WEIGHTS))


def _mask_options(cfg: CfgNode, channels: int) -> Dict[str, Any]:
    """torchvision's ``mask_*`` constructor arguments from MODEL.ROI_MASK_HEAD."""
    mask = cfg.MODEL.ROI_MASK_HEAD
    return dict(
        mask_roi_pool=MultiScaleRoIAlign(_featmap_names(mask.POOLER_SCALES, "MODEL.ROI_MASK_HEAD.POOLER_SCALES"),
                                         mask.POOLER_RESOLUTION, mask.POOLER_SAMPLING_RATIO),
        mask_head=build_mask_head(channels, mask.CONV_LAYERS, mask.DILATION, mask_head_spec(cfg)),
        mask_predictor=build_mask_predictor(mask.CONV_LAYERS[-1], cfg.MODEL.ROI_BOX_HEAD.NUM_CLASSES))


def _benchmark_rpn(rpn: CfgNode, anchors: AnchorGenerator, rpn_head: RPNHead) -> BenchmarkRegionProposalNetwork:
    """The RPN with maskrcnn-benchmark's straddle rule, per-level and per-batch proposal budgets and
    MODEL.RPN.MIN_SIZE, sharing the anchors and head given to torchvision's constructor."""
    network = BenchmarkRegionProposalNetwork(
        anchors, rpn_head, rpn.FG_IOU_THRESHOLD, rpn.BG_IOU_THRESHOLD, rpn.BATCH_SIZE_PER_IMAGE, rpn.POSITIVE_FRACTION,
        dict(training=rpn.PRE_NMS_TOP_N_TRAIN, testing=rpn.PRE_NMS_TOP_N_TEST),
        dict(training=rpn.FPN_POST_NMS_TOP_N_TRAIN, testing=rpn.FPN_POST_NMS_TOP_N_TEST), rpn.NMS_THRESH,
        straddle_thresh=rpn.STRADDLE_THRESH, per_batch_in_training=rpn.FPN_POST_NMS_PER_BATCH,
        post_nms_top_n_per_level=dict(training=rpn.POST_NMS_TOP_N_TRAIN, testing=rpn.POST_NMS_TOP_N_TEST))
    network.min_size = max(float(rpn.MIN_SIZE), TORCHVISION_RPN_MIN_SIZE)
    return network


def _detection_transform(cfg: CfgNode) -> DetectionTransform:
    """Resizing, normalization and batching of the input images from INPUT and DATALOADER."""
    data = cfg.INPUT
    return DetectionTransform(data.MIN_SIZE_TRAIN, data.MAX_SIZE_TRAIN, data.MIN_SIZE_TEST, data.MAX_SIZE_TEST,
                              data.PIXEL_MEAN, data.PIXEL_STD, data.TO_BGR255, cfg.DATALOADER.SIZE_DIVISIBILITY)


def build_detection_model(cfg: CfgNode) -> nn.Module:
    """Mask R-CNN (``MODEL.MASK_ON``) or Faster R-CNN with a ResNet-FPN backbone, on the CPU.

    The parts are built in a fixed order (backbone, RPN head, box head, mask head), so ``SEED``
    fixes every initial weight."""
    _check_supported(cfg)
    channels = cfg.MODEL.RESNETS.BACKBONE_OUT_CHANNELS
    backbone = build_resnet_fpn_backbone(_backbone_options(cfg))
    options = _rpn_options(cfg.MODEL.RPN, channels)
    options.update(_box_options(cfg, channels))
    if cfg.MODEL.MASK_ON:
        options.update(_mask_options(cfg, channels))
        model = MaskRCNN(backbone, **options)
    else:
        model = FasterRCNN(backbone, **options)
    # torchvision's constructor builds its own RPN and transform from the same numbers; ours add the
    # straddle rule, the per-level and per-batch proposal budgets and the published pixel convention.
    model.rpn = _benchmark_rpn(cfg.MODEL.RPN, options["rpn_anchor_generator"], options["rpn_head"])
    model.transform = _detection_transform(cfg)
    return model
