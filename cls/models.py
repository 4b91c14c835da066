"""ResNets whose every normalization (stem, blocks, downsample) comes from one norm factory.

``resnet18/34/50/101`` follow the published network (torchvision layout and parameter names,
stride on the 3x3 conv of the bottleneck), so published checkpoints load by name. ``resnet20``
is the CIFAR network of He et al. (3 stages of 16/32/64 channels, 3 basic blocks each, a 3x3
stem without max-pooling; projection shortcuts) for 32-pixel inputs and CPU runs.

Initialization as published: convolutions Kaiming-normal (fan_out, ReLU), norm weights 1 and
biases 0, the classifier torch's default.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Type, Union

from torch import Tensor, nn

from cls.errors import UserError

__all__ = ["ARCH_BUILDERS", "BasicBlock", "Bottleneck", "ResNet", "CifarResNet", "build_model", "init_weights"]

NormFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm: NormFactory, conv: Type[nn.Conv2d]):
        super().__init__()
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm: NormFactory, conv: Type[nn.Conv2d]):
        super().__init__()
        self.conv1 = conv(inplanes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * self.expansion, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def _make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int, norm: NormFactory,
                conv: Type[nn.Conv2d]) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv(inplanes, planes * block.expansion, kernel_size=1, stride=stride, padding=0, bias=False),
            norm(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, norm, conv)]
    layers += [block(planes * block.expansion, planes, 1, None, norm, conv) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


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


class ResNet(nn.Module):
    """ImageNet ResNet (7x7 stem, max-pool, four stages)."""

    def __init__(self, block: Block, layers: List[int], num_classes: int, norm: NormFactory,
                 conv: Type[nn.Conv2d] = nn.Conv2d):
        super().__init__()
        self.conv1 = conv(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = _make_stage(block, inplanes, planes, blocks, 1 if index == 0 else 2, norm, conv)
            setattr(self, f"layer{index + 1}", stage)
            inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3x3 stem, three stages of 16/32/64 channels."""

    def __init__(self, blocks_per_stage: int, num_classes: int, norm: NormFactory,
                 conv: Type[nn.Conv2d] = nn.Conv2d):
        super().__init__()
        self.conv1 = conv(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(BasicBlock, 16, 16, blocks_per_stage, 1, norm, conv)
        self.layer2 = _make_stage(BasicBlock, 16, 32, blocks_per_stage, 2, norm, conv)
        self.layer3 = _make_stage(BasicBlock, 32, 64, blocks_per_stage, 2, norm, conv)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


ARCH_BUILDERS = {
    "resnet18": lambda n, norm, conv: ResNet(BasicBlock, [2, 2, 2, 2], n, norm, conv),
    "resnet34": lambda n, norm, conv: ResNet(BasicBlock, [3, 4, 6, 3], n, norm, conv),
    "resnet50": lambda n, norm, conv: ResNet(Bottleneck, [3, 4, 6, 3], n, norm, conv),
    "resnet101": lambda n, norm, conv: ResNet(Bottleneck, [3, 4, 23, 3], n, norm, conv),
    "resnet20": lambda n, norm, conv: CifarResNet(3, n, norm, conv),
}


def build_model(arch: str, num_classes: int, norm: NormFactory, conv: Type[nn.Conv2d] = nn.Conv2d) -> nn.Module:
    """``arch`` with ``num_classes`` outputs, norms from ``norm(C)`` and convs of class ``conv``."""
    key = arch.lower()
    if key not in ARCH_BUILDERS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_BUILDERS)}")
    return ARCH_BUILDERS[key](num_classes, norm, conv)
