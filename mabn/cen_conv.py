"""Weight-centralized convolutions.

Yan et al., "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization", ICLR 2020, section 4.2: each output channel's filter is shifted to zero mean
before the convolution, so the pre-activation has (approximately) zero mean and the following
MABN layer only needs to normalize the second moment.

The layers subclass ``nn.ConvNd``: same constructor, parameters, initialisation and state dict,
so ``isinstance`` checks, weight loading, folding and export keep working. Only the weight that
reaches the convolution differs (``centralized_weight``). The convolution saves the input and
the raw weight, like ``nn.ConvNd``, plus one filter mean per output channel.

Two exact formulations of the same convolution, chosen per call:

* **centralized weight** (GPUs, grouped convs, autocast, and weights smaller than the input):
  ``conv(x, W - m)``, the centralized weight made in the forward and again in the backward.
* **box sum** (CPU, ``groups=1``, a weight with more elements than the input: the deep layers of
  a network at 1-4 images): ``conv(x, W) - m * box(x)``, where ``box(x)`` sums the input's
  channels over each kernel window (a channel sum and a convolution with a one-channel kernel of
  ones). Its backward corrects the raw weight's input gradient by the transposed box sum of
  ``sum_o m_o dy_o`` and projects the weight gradient in place. No weight-sized tensor is made
  besides the weight gradient: on the CPU a new weight-sized tensor costs page faults, several
  times the arithmetic of the subtraction. On a GPU the extra small kernels cost more than the
  weight-sized passes they save, so GPUs keep the first formulation.

The two differ only in rounding. The box sum subtracts ``m * box(x)`` from a convolution that
contains it, which loses precision only where the filter means are large against the centralized
filters; training leaves them where initialization (near zero) and weight decay put them, since
the projected gradient has zero filter means.
Under autocast (CPU or CUDA) the convolution runs in the autocast dtype, as ``nn.ConvNd``'s does,
and its backward runs in that same dtype.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mabn.groups import cached_constant
from mabn.precision import cast

__all__ = ["CONV_TYPES", "CenConv1d", "CenConv2d", "CenConv3d", "centralize_weight", "plain_conv_class"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _filter_means(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.mean(dim=tuple(range(1, tensor.dim())), keepdim=True)


def _subtract_filter_means(tensor: torch.Tensor) -> torch.Tensor:
    return tensor - _filter_means(tensor)



def _centralize_(tensor: torch.Tensor) -> torch.Tensor:
    """Subtract the filter means of a tensor this code owns, in place (no new weight-sized tensor)."""
    return tensor.sub_(_filter_means(tensor))


def _as_channels(means: torch.Tensor) -> torch.Tensor:
    """(O, 1, ...) filter means as (1, O, 1, ...), broadcasting over a conv output."""
    return means.view(1, -1, *means.shape[2:])


def _box_sum_is_cheaper(input: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the box-sum formulation serves this call (see the module docstring): a CPU input,
    one group, and a weight with more elements than the input."""
    return input.device.type == "cpu" and groups == 1 and weight.numel() > input.numel()


def _ones_kernel(input: torch.Tensor, kernel_size: Sequence[int]) -> torch.Tensor:
    return cached_constant(("box_sum_ones", tuple(kernel_size), input.dtype), input.device,
                           lambda d: torch.ones((1, 1, *kernel_size), dtype=input.dtype, device=d))


def _box_sum(input: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             dilation: Sequence[int]) -> torch.Tensor:
    """(N, 1, *out): the input summed over its channels and over each window of the conv."""
    spatial = len(kernel_size)
    return torch.convolution(input.sum(dim=1, keepdim=True), _ones_kernel(input, kernel_size), None, stride,
                             padding, dilation, False, [0] * spatial, 1)


def _box_sum_transposed(values: torch.Tensor, input_shape: Sequence[int], kernel_size: Sequence[int],
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The adjoint of :func:`_box_sum` on (N, 1, *out) ``values``, as (N, 1, *in): broadcast over
    the input's channels, it is the input gradient of ``box(x) * values``."""
    output_padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, k, s, p, d in
                      zip(input_shape[2:], values.shape[2:], kernel_size, stride, padding, dilation)]
    return torch.convolution(values, _ones_kernel(values, kernel_size), None, stride, padding, dilation, True,
                             output_padding, 1)


def _box_sum_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, means: torch.Tensor,
                      conv_args: tuple, has_bias: bool, output_mask: Tuple[bool, bool, bool]):
    """Gradients of ``conv(x, W) - m * box(x)`` (the box-sum forward) for ``_CentralizedConvolution``:
    the raw weight's input gradient minus the transposed box sum of ``sum_o m_o dy_o``, and the weight
    gradient with its filter means subtracted in place."""
    stride, padding, dilation, groups = conv_args
    kernel_size = weight.shape[2:]
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, input, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
        [0] * len(kernel_size), groups, list(output_mask))
    if grad_input is not None:
        spatial = len(kernel_size)
        weighted = torch.convolution(grad_output, _as_channels(means), None, [1] * spatial,
                                     [0] * spatial, [1] * spatial, False, [0] * spatial, 1)
        grad_input.sub_(_box_sum_transposed(weighted, input.shape, kernel_size, stride, padding, dilation))
    if grad_weight is not None:
        grad_weight = _centralize_(grad_weight)
    return grad_input, grad_weight, grad_bias, None, None, None, None


class _Centralize(torch.autograd.Function):
    """Centralization is a symmetric projection, so its backward is the same projection of the
    gradient: two kernels instead of autograd's chain through ``mean`` and ``sub``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return _subtract_filter_means(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _subtract_filter_means(grad)


def _autocast_dtype(input: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs a convolution of ``input`` in, or None where it leaves it alone.

    Follows autocast's lower-precision policy for convolutions (float64 and non-float inputs keep
    their dtype) for the input's own device type, so one Function serves CPU and CUDA.
    """
    device_type = input.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return None
    if not input.is_floating_point() or input.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_disabled(device_type: str) -> ContextManager:
    """A context in which autocast casts no ``device_type`` op (a no-op where it has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _CentralizedConvolution(torch.autograd.Function):
    """``convolution(input, centralize(weight), bias)`` saving the input and the RAW weight.

    Composing ``_Centralize`` with ``F.conv2d`` would make the conv save the centralized weight,
    a new tensor per call (tens of MiB for a ResNet-50). Here the forward saves the filter means
    (one value per output channel), and the backward either recomputes the centralized weight from
    them (one subtraction, no second reduction over the weight) or, in the box-sum formulation,
    corrects the raw weight's input gradient; either way it projects the weight gradient, so a
    CenConv saves what an ``nn.ConvNd`` saves. Each call keeps its own context, so a conv applied
    several times before one backward (shared heads, FPN) accumulates correct gradients.

    Autocast is resolved here rather than inside ``torch.convolution``: the forward casts the
    input, centralized weight and bias to the autocast dtype itself and runs the convolution with
    autocast off, and the backward (which autocast never sees) casts ``grad_output``, input and
    weight to the dtype the forward's convolution ran in, so ``convolution_backward`` gets one
    dtype. Gradients come back in the dtypes of the input, weight and bias.
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Tuple[int, ...], padding: Tuple[int, ...], dilation: Tuple[int, ...],
                groups: int) -> torch.Tensor:
        means = _filter_means(weight)
        ctx.save_for_backward(input, weight, means)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.device_type = input.device.type
        dtype = _autocast_dtype(input)
        ctx.box_sum = dtype is None and _box_sum_is_cheaper(input, weight, groups)
        if ctx.box_sum:
            output = torch.convolution(input, weight, bias, stride, padding, dilation, False,
                                       [0] * (weight.dim() - 2), groups)
            ctx.compute_dtype = output.dtype
            return output.addcmul_(_box_sum(input, weight.shape[2:], stride, padding, dilation), _as_channels(means),
                                   value=-1.0)
        centralized = weight - means
        if dtype is not None:
            input, centralized = cast(input, dtype), cast(centralized, dtype)
            bias = None if bias is None else cast(bias, dtype)
        output_padding = [0] * (weight.dim() - 2)
        with _autocast_disabled(ctx.device_type):
            output = torch.convolution(input, centralized, bias, stride, padding, dilation,
                                       False, output_padding, groups)
        ctx.compute_dtype = output.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, weight, means = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        dtype = ctx.compute_dtype
        has_bias = ctx.bias_dtype is not None
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if ctx.box_sum:
            return _box_sum_backward(grad_output, input, weight, means, ctx.conv_args, has_bias,
                                     (needs_input, needs_weight, needs_bias and has_bias))
        with _autocast_disabled(ctx.device_type):
            grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                cast(grad_output, dtype), cast(input, dtype), cast(weight - means, dtype),
                [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
                [0] * (weight.dim() - 2), groups, [needs_input, needs_weight, needs_bias and has_bias])
            if grad_input is not None:
                grad_input = cast(grad_input, input.dtype)
            if grad_weight is not None:
                grad_weight = _centralize_(cast(grad_weight, weight.dtype))
            if grad_bias is not None:
                grad_bias = cast(grad_bias, ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


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
        # Padding the convolution cannot express itself (other modes, asymmetric 'same') is
        # applied to the input first, as nn.ConvNd does; the Function then sees padding 0.
        pads = self._reversed_padding_repeated_twice
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            if self.padding_mode == "zeros" and pads[0::2] == pads[1::2]:
                padding = tuple(reversed(pads[0::2]))
            else:
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                input = F.pad(input, pads, mode=mode)
                padding = (0,) * (self.weight.dim() - 2)
        return _CentralizedConvolution.apply(input, self.weight, self.bias, self.stride, padding,
                                             self.dilation, self.groups)


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
