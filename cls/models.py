"""ResNets whose every normalization (stem, blocks, downsample) comes from one norm factory.

``resnet18/34/50/101`` are torchvision's (the published layout and parameter names, stride on
the 3x3 conv of the bottleneck) built with ``norm_layer``, so published checkpoints load by
name. ``resnet20`` is the CIFAR network of He et al. (3 stages of 16/32/64 channels, 3 basic
blocks each, a 3x3 stem without max-pooling; projection shortcuts) for 32-pixel inputs and CPU
runs, assembled from torchvision's ``BasicBlock``; ``resnet14`` and ``resnet8`` are the same
network with 2 and 1 blocks per stage, for the shortest CPU runs. Weight-centralized convs come from
``mabn.convert_conv``.

Initialization as published: convolutions Kaiming-normal (fan_out, ReLU), norm weights 1 and
biases 0, the classifier torch's default.
"""
from __future__ import annotations

from typing import Callable, Type

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

import mabn
from mabn.utils.errors import UserError

__all__ = ["ARCH_BUILDERS", "OUTPUT_STRIDES", "CifarResNet", "build_model", "init_weights", "min_image_size"]

NormFactory = Callable[[int], nn.Module]


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU); affine norm weights 1 and biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif not isinstance(module, (nn.Linear, nn.Sequential)) and not list(module.children()):
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(weight, nn.Parameter):
                nn.init.ones_(weight)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)


def _basic_stage(inplanes: int, planes: int, blocks: int, stride: int, norm: NormFactory) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                   norm(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm)]
    layers += [BasicBlock(planes, planes, norm_layer=norm) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3x3 stem, three stages of 16/32/64 channels."""

    def __init__(self, blocks_per_stage: int, num_classes: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _basic_stage(16, 16, blocks_per_stage, 1, norm)
        self.layer2 = _basic_stage(16, 32, blocks_per_stage, 2, norm)
        self.layer3 = _basic_stage(32, 64, blocks_per_stage, 2, norm)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _torchvision_resnet(arch: str) -> Callable[[int, NormFactory], nn.Module]:
    return lambda n, norm: getattr(torchvision.models, arch)(weights=None, num_classes=n, norm_layer=norm)


ARCH_BUILDERS = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "resnet8": lambda n, norm: CifarResNet(1, n, norm),
    "resnet14": lambda n, norm: CifarResNet(2, n, norm),
    "resnet20": lambda n, norm: CifarResNet(3, n, norm),
}


# How much each network downsamples its input: the last feature map of an image_size input is
# ceil(image_size / stride) pixels on a side.
OUTPUT_STRIDES = {"resnet18": 32, "resnet34": 32, "resnet50": 32, "resnet101": 32, "resnet8": 4, "resnet14": 4,
                  "resnet20": 4}


def min_image_size(arch: str, single_value_norm: bool = False) -> int:
    """The smallest input side for ``arch``: a last feature map of 1x1, or of 2x2 when a norm
    would otherwise see a single value per channel (instance norm, or a normalization batch of 1)."""
    return OUTPUT_STRIDES[arch.lower()] * (2 if single_value_norm else 1)


def build_model(arch: str, num_classes: int, norm: NormFactory, conv: Type[nn.Conv2d] = nn.Conv2d) -> nn.Module:
    """``arch`` with ``num_classes`` outputs, norms from ``norm(C)`` and convs of class ``conv``
    (``nn.Conv2d`` or ``mabn.CenConv2d``)."""
    key = arch.lower()
    if key not in ARCH_BUILDERS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_BUILDERS)}")
    model = ARCH_BUILDERS[key](num_classes, norm)
    if issubclass(conv, mabn.CenConv2d):
        model = mabn.convert_conv(model, "CenConv")
    init_weights(model)
    return model
