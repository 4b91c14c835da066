"""ResNet-FPN backbone: torchvision's ResNet and FeaturePyramidNetwork with the published norms
and initialization.

The body is ``torchvision.models.resnet{18,34,50,101,152}`` built with the body's ``norm_layer``,
``groups`` and ``width_per_group`` (ResNeXt-101 32x8d is ``resnet101`` with 32 groups of width 8,
torchvision's ``resnext101_32x8d`` layout), so a torchvision or ``cls`` ResNet state dict loads by
name under ``backbone.body.``. Every body conv (stem, bottleneck or basic-block convs, downsample
convs) is re-initialized as maskrcnn-benchmark does: ``kaiming_uniform_(a=1)``, i.e. uniform with
std ``1 / sqrt(fan_in)`` (torchvision's own ResNet init is Kaiming-normal fan_out). The FPN is
torchvision's, whose init already is the published one (``kaiming_uniform_(a=1)``, zero biases),
with the FPN's ``norm_layer`` on its inner (1x1) and output (3x3) convs (no norm: convs with bias)
and a stride-2 max-pool P6, as published. With MABN every conv of the part becomes a
``mabn.CenConv2d`` (the weights are kept).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import Bottleneck
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import mabn
from mabn.utils.errors import UserError
from det.modeling.norms import NormSpec

__all__ = ["ResNetFPNOptions", "build_resnet_fpn_backbone", "freeze_body", "init_body_convs", "move_stride_to_1x1"]

RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
"""Body stages res2..res5 (strides 4..32) as FPN inputs; P6 (stride 64) is pooled from P5."""


def move_stride_to_1x1(body: nn.Module) -> None:
    """Put each bottleneck's stride on its first 1x1 conv instead of the 3x3 (MSRA / published
    ResNets, ``STRIDE_IN_1X1=True``); parameters and their shapes are unchanged."""
    for module in body.modules():
        if isinstance(module, Bottleneck) and module.conv2.stride != (1, 1):
            module.conv1.stride, module.conv2.stride = module.conv2.stride, (1, 1)


def init_body_convs(body: nn.Module) -> None:
    """maskrcnn-benchmark's init of every ResNet conv: ``kaiming_uniform_(a=1)`` (Caffe2's
    XavierFill), zero biases."""
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=1)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def freeze_body(body: nn.Module, freeze_at: int) -> None:
    """``requires_grad=False`` for the stem (``freeze_at >= 1``) and ``layer1 .. layer{freeze_at-1}``
    (res2 .. res{freeze_at}), as maskrcnn-benchmark's FREEZE_CONV_BODY_AT; -1 or 0 freeze nothing."""
    parts = [[body.conv1, body.bn1]] + [[getattr(body, f"layer{i}")] for i in range(1, 5)]
    for stage in parts[:max(freeze_at, 0)]:
        for module in stage:
            for parameter in module.parameters():
                parameter.requires_grad_(False)


def _resnet(depth: int, norm_layer: Callable[[int], nn.Module], groups: int, width_per_group: int) -> nn.Module:
    try:
        return getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer, groups=groups,
                                                              width_per_group=width_per_group)
    except ValueError as exc:  # BasicBlock refuses groups / width
        raise UserError(f"MODEL.RESNETS.NUM_GROUPS / WIDTH_PER_GROUP for R-{depth}: {exc}") from None


@dataclass(frozen=True)
class ResNetFPNOptions:
    """A ResNet-``depth`` body with ``norm`` everywhere and an FPN with ``fpn_norm`` (None: the body's,
    none for a FrozenBN body) producing ``out_channels`` maps; ``freeze_at`` as in :func:`freeze_body`;
    ``groups`` and ``width_per_group`` as in torchvision's ResNet; ``stem_out_channels`` and
    ``res2_out_channels`` (None: not checked) must match what the body has; ``fpn_relu`` adds a ReLU
    after each FPN conv."""

    depth: int
    norm: NormSpec
    out_channels: int
    stride_in_1x1: bool
    freeze_at: int
    fpn_norm: Optional[NormSpec] = None
    groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: Optional[int] = None
    fpn_relu: bool = False


def _check_options(options: ResNetFPNOptions) -> None:
    """The config errors that show before the body is built, each as one :class:`UserError` line."""
    if options.norm.layer is None:
        raise UserError("the body needs a norm (FrozenBN for the standard fine-tune body)")
    if options.stem_out_channels != 64:
        raise UserError(f"MODEL.RESNETS.STEM_OUT_CHANNELS {options.stem_out_channels}: torchvision's ResNet stem "
                        f"has 64")
    if options.freeze_at > 5:
        raise UserError(f"MODEL.BACKBONE.FREEZE_CONV_BODY_AT {options.freeze_at}: at most 5 (stem and res2..res5), "
                        f"-1 for nothing")


def build_resnet_fpn_backbone(options: ResNetFPNOptions) -> BackboneWithFPN:
    """The ResNet body and FPN that ``options`` describe, producing maps '0'..'3' and 'pool' (P2..P6)."""
    depth, norm, fpn_norm = options.depth, options.norm, options.fpn_norm
    if fpn_norm is None:
        fpn_norm = NormSpec("", None, False) if norm.name == "FrozenBN" else norm
    _check_options(options)
    body = _resnet(depth, norm.layer, options.groups, options.width_per_group)
    init_body_convs(body)
    last_block = body.layer1[-1]
    res2 = (last_block.conv3 if depth >= 50 else last_block.conv2).out_channels
    if options.res2_out_channels is not None and options.res2_out_channels != res2:
        raise UserError(f"MODEL.RESNETS.RES2_OUT_CHANNELS {options.res2_out_channels} does not match R-{depth}, "
                        f"whose res2 has {res2} channels; set it to {res2}")
    if options.stride_in_1x1:
        move_stride_to_1x1(body)
    if norm.centralize_convs:
        body = mabn.convert_conv(body, "CenConv")
    freeze_body(body, options.freeze_at)
    in_channels = [res2 * 2 ** i for i in range(4)]
    backbone = BackboneWithFPN(body, RETURN_LAYERS, in_channels, options.out_channels,
                               extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm.layer)
    if options.fpn_relu:
        for block in [*backbone.fpn.inner_blocks, *backbone.fpn.layer_blocks]:
            block.append(nn.ReLU(inplace=True))
    if fpn_norm.centralize_convs:
        backbone.fpn = mabn.convert_conv(backbone.fpn, "CenConv")
    return backbone
