"""RoI heads on torchvision's modules, with the published norms and initialization.

Box head ``FPNXconv1fc<NORM>``: torchvision's ``FastRCNNConvFCHead`` (NUM_STACKED_CONVS convs of
CONV_HEAD_DIM, each followed by the norm and ReLU, then one fc of MLP_HEAD_DIM); the published
init is normal(std=0.01) for the convs and Kaiming-uniform(a=1) for the fc. ``FPN2MLP``:
torchvision's ``TwoMLPHead``. Mask head ``MaskRCNNFPN<NORM>``: torchvision's ``MaskRCNNHeads``
(Kaiming-normal convs, as published). With MABN the head convs are ``mabn.CenConv2d``. Predictors
have no norm: class scores normal(0.01), box deltas normal(0.001), zero biases, as published.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import mabn
from det.modeling.norms import NormSpec

__all__ = ["build_box_head", "build_box_predictor", "build_mask_head", "build_mask_predictor"]


def _init_fc(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)


def build_box_head(in_channels: int, resolution: int, with_convs: bool, num_convs: int, conv_dim: int,
                   mlp_dim: int, norm: NormSpec) -> nn.Module:
    """The box feature extractor: ``FastRCNNConvFCHead`` (``with_convs``) or ``TwoMLPHead``."""
    if not with_convs:
        head = TwoMLPHead(in_channels * resolution ** 2, mlp_dim)
        _init_fc(head)
        return head
    head = FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_dim] * num_convs, [mlp_dim],
                              norm_layer=norm.layer)
    for layer in head.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    _init_fc(head)
    return mabn.convert_conv(head, "CenConv") if norm.centralize_convs else head


def build_box_predictor(in_features: int, num_classes: int) -> FastRCNNPredictor:
    predictor = FastRCNNPredictor(in_features, num_classes)
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


def build_mask_head(in_channels: int, layers: Sequence[int], dilation: int, norm: NormSpec) -> MaskRCNNHeads:
    head = MaskRCNNHeads(in_channels, list(layers), dilation, norm_layer=norm.layer)
    return mabn.convert_conv(head, "CenConv") if norm.centralize_convs else head


def build_mask_predictor(in_channels: int, num_classes: int) -> MaskRCNNPredictor:
    """ConvTranspose 2x2/2 -> ReLU -> 1x1 to one mask per class (Kaiming-normal, zero biases)."""
    return MaskRCNNPredictor(in_channels, in_channels, num_classes)
