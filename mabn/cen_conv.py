"""Weight-centralized convolutions.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization", ICLR 2020, section 4.2: each output channel's filter is shifted to zero mean
before the convolution, so the pre-activation has (approximately) zero mean and the following
MABN layer only needs to normalize the second moment.

The layers subclass ``nn.ConvNd``: same constructor, parameters, initialisation and state dict,
so ``isinstance`` checks, weight loading, folding and export keep working. Only the weight that
reaches the convolution differs (``centralized_weight``).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import nn

__all__ = ["CONV_TYPES", "CenConv1d", "CenConv2d", "CenConv3d", "centralize_weight", "plain_conv_class"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _subtract_filter_means(tensor: torch.Tensor) -> torch.Tensor:
    return tensor - tensor.mean(dim=tuple(range(1, tensor.dim())), keepdim=True)


class _Centralize(torch.autograd.Function):
    """Centralization is a symmetric projection, so its backward is the same projection of the
    gradient: two kernels instead of autograd's chain through ``mean`` and ``sub``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return _subtract_filter_means(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _subtract_filter_means(grad)


def plain_conv_class(conv: nn.Module) -> type:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``: the torch conv that ``conv`` derives from."""
    return next(cls for cls in type(conv).__mro__ if cls in CONV_TYPES)


def centralize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Subtract from each output filter its mean over (in_channels / groups, *kernel)."""
    return _Centralize.apply(weight)


class _CenConvMixin:
    """Convolve with the centralized weight; everything else is the parent ``nn.ConvNd``.

    The constructor keeps the parent's arguments with the published defaults
    (``kernel_size=3``, ``bias=False``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, ...]] = 3,
        stride: Union[int, Tuple[int, ...]] = 1,
        padding: Union[str, int, Tuple[int, ...]] = 0,
        dilation: Union[int, Tuple[int, ...]] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)

    @property
    def centralized_weight(self) -> torch.Tensor:
        return centralize_weight(self.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.centralized_weight, self.bias)


class CenConv1d(_CenConvMixin, nn.Conv1d):
    """``nn.Conv1d`` whose filters are centralized per output channel before use."""


class CenConv2d(_CenConvMixin, nn.Conv2d):
    """``nn.Conv2d`` whose filters are centralized per output channel before use.

    Positional order and defaults follow the published layer
    ``CenConv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=0, dilation=1,
    groups=1, bias=False)``; ``padding_mode``, ``device`` and ``dtype`` follow ``nn.Conv2d``.
    """


class CenConv3d(_CenConvMixin, nn.Conv3d):
    """``nn.Conv3d`` whose filters are centralized per output channel before use."""
