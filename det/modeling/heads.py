"""RoI heads on torchvision's modules, with the published norms and initialization.

Box head ``FPNXconv1fc[<NORM>]``: torchvision's ``FastRCNNConvFCHead`` (NUM_STACKED_CONVS 3x3
convs of CONV_HEAD_DIM with DILATION, each followed by the norm and ReLU, then one fc of
MLP_HEAD_DIM and ReLU); published init: normal(std=0.01) convs (zero biases when there is no
norm), Kaiming-uniform(a=1) fc with zero bias. ``FPN2MLP``: two fc of MLP_HEAD_DIM with ReLU
(torchvision's ``TwoMLPHead``; with GroupNorm, :class:`TwoMLPGroupNormHead`, whose fc have no
bias), Kaiming-uniform(a=1), zero biases. Mask head ``MaskRCNNFPN[<NORM>]``: torchvision's
``MaskRCNNHeads`` (3x3 convs, norm, ReLU), whose Kaiming-normal (fan_out, ReLU) init with zero
biases is the published one. With MABN the head convs are ``mabn.CenConv2d``. Predictors have no
norm: class scores normal(0.01), box deltas normal(0.001), zero biases; mask predictor
Kaiming-normal (fan_out, ReLU) with zero biases, as published.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import mabn
from det.modeling.norms import NormSpec

__all__ = ["TwoMLPGroupNormHead", "build_box_head", "build_box_predictor", "build_mask_head",
           "build_mask_predictor"]


def _init_fc(module: nn.Module) -> None:
    """maskrcnn-benchmark's ``make_fc``: Kaiming-uniform(a=1) weights, zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class TwoMLPGroupNormHead(nn.Module):
    """``FPN2MLPFeatureExtractor`` with ``USE_GN``: fc6 -> norm6 -> ReLU -> fc7 -> norm7 -> ReLU,
    the fc without bias (maskrcnn-benchmark's ``make_fc(..., use_gn=True)``)."""

    def __init__(self, in_features: int, representation_size: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size, bias=False)
        self.norm6 = norm_layer(representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size, bias=False)
        self.norm7 = norm_layer(representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm6(self.fc6(x.flatten(start_dim=1))))
        return F.relu(self.norm7(self.fc7(x)))


def build_box_head(in_channels: int, resolution: int, with_convs: bool, num_convs: int, conv_dim: int,
                   mlp_dim: int, norm: NormSpec, dilation: int = 1) -> nn.Module:
    """The box feature extractor: ``FastRCNNConvFCHead`` (``with_convs``) or the two-fc head."""
    if not with_convs:
        in_features = in_channels * resolution ** 2
        head = TwoMLPHead(in_features, mlp_dim) if norm.layer is None else TwoMLPGroupNormHead(
            in_features, mlp_dim, norm.layer)
        _init_fc(head)
        return head
    head = FastRCNNConvFCHead((in_channels, resolution, resolution), [conv_dim] * num_convs, [mlp_dim],
                              norm_layer=norm.layer)
    for layer in head.modules():
        if isinstance(layer, nn.Conv2d):
            layer.dilation, layer.padding = (dilation, dilation), (dilation, dilation)
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    _init_fc(head)
    return mabn.convert_conv(head, "CenConv") if norm.centralize_convs else head


def build_box_predictor(in_features: int, num_classes: int) -> FastRCNNPredictor:
    """maskrcnn-benchmark's ``FPNPredictor``: class scores and per-class box deltas."""
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
    """ConvTranspose 2x2/2 -> ReLU -> 1x1 to one mask per class (Kaiming-normal fan_out, zero
    biases: torchvision leaves the biases at torch's default, maskrcnn-benchmark zeroes them)."""
    predictor = MaskRCNNPredictor(in_channels, in_channels, num_classes)
    for layer in (predictor.conv5_mask, predictor.mask_fcn_logits):
        nn.init.zeros_(layer.bias)
    return predictor
