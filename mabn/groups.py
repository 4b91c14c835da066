"""Normalization groups: ``B`` consecutive samples of a batch share their statistics.

MABN (``split_batch=True``), Batch Renormalization and ghost BN all simulate a small
normalization batch ``B`` inside a larger SGD batch. The checks live here once, and so do the
per-group statistics and the grouped batch norm (with its hand-written backward) that ghost BN
and Batch Renormalization share. Both work on the (G, B, C, S) view of the input with
statistics shaped (G, 1, C, 1), so that every per-group coefficient broadcasts without a copy:
at tiny batches a layer's cost is its number of dispatched ops (kernel launches on a GPU), and
:func:`cached_constant` keeps constant tensors from costing one per call.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["cached_constant", "check_group_size", "check_norm_input", "count_groups", "filled",
           "group_batch_norm", "group_statistics", "grouped_batch_norm", "grouped_moments"]


_CONSTANTS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_MAX_CONSTANTS = 256


def _tracing(device: torch.device) -> bool:
    """A compiler, a fake-tensor trace or a CUDA graph capture is on: constants are built in place."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cached_constant(key: tuple, device: torch.device, build: Callable[[torch.device], Tensor]) -> Tensor:
    """``build(device)``, built once per ``key`` and device in eager mode (each build is a dispatched
    op, a kernel launch on a GPU, in every call otherwise). The tensors are read-only inputs of the
    kernels: never modify one. ``key`` must determine the tensor (shape, dtype, values)."""
    if _tracing(device):
        return build(device)
    key = key + (device,)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        with torch.inference_mode(False), torch.no_grad():
            tensor = build(device)
        _CONSTANTS[key] = tensor
        if len(_CONSTANTS) > _MAX_CONSTANTS:
            _CONSTANTS.popitem(last=False)
    return tensor


def filled(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached (n,) tensor of ``value`` (see :func:`cached_constant`)."""
    return cached_constant(("full", n, value, dtype), device,
                           lambda d: torch.full((n,), value, dtype=dtype, device=d))


def check_norm_input(layer_name: str, num_features: int, dims: Tuple[int, ...], input: Tensor) -> None:
    """``ValueError`` naming the layer when ``input`` is not of a rank in ``dims`` (N, C, ...) or
    has another channel count than ``num_features``."""
    if input.dim() not in dims:
        ranks = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{layer_name} expects {ranks} input (N, C, ...), got shape {tuple(input.shape)}")
    if input.shape[1] != num_features:
        raise ValueError(f"{layer_name}({num_features}) got an input with {input.shape[1]} channels "
                         f"(shape {tuple(input.shape)}); build the layer with num_features={input.shape[1]}")


def check_group_size(B: object, *, allow_none: bool = False) -> Optional[int]:
    """``B`` itself when it is a positive int (or None where ``allow_none``); raises otherwise."""
    if B is None and allow_none:
        return None
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        allowed = "None or a positive int" if allow_none else "a positive int"
        raise ValueError(f"B (the normalization batch size) must be {allowed}, got {B!r}")
    return B


def count_groups(layer_name: str, B: Optional[int], batch: int) -> int:
    """``batch // B`` (1 when ``B`` is None); raises when ``batch`` is not a multiple of ``B``."""
    if B is None:
        return 1
    if batch % B != 0:
        raise ValueError(f"{layer_name} normalizes groups of B={B} consecutive samples, but the batch "
                         f"has {batch} samples; use a batch size divisible by {B}")
    return batch // B


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(N, C, *S) as (G, N / G, C, prod(S)); a view for contiguous and channels-last tensors."""
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def grouped_moments(x4: Tensor, correction: int = 0) -> Tuple[Tensor, Tensor]:
    """Mean and variance (biased, or with Bessel's ``correction=1``) of each group and channel of
    a (G, B, C, S) view, each (G, 1, C, 1) (broadcasting over the view), without gradient: one
    reduction kernel over the non-adjacent dims B and S (Welford's, exact for ``|mean| >> std``)."""
    with torch.no_grad():
        var, mean = torch.var_mean(x4, dim=(1, 3), correction=correction, keepdim=True)
    return mean, var


def group_statistics(x: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Per-group, per-channel mean and biased variance of (N, C, *S) ``x``, each (G, C), from
    one reduction over the (G, B, C, S) view (no copy for contiguous or channels-last input)."""
    mean, var = grouped_moments(_grouped(x, groups))
    return mean.view(groups, -1), var.view(groups, -1)


def _product(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return a if b is None else b if a is None else a * b


class _GroupBatchNorm(torch.autograd.Function):
    """``y = x_hat * scale + shift`` on a (G, B, C, S) view ``x``, with ``x_hat = (x - mean) *
    invstd`` for its (G, 1, C, 1) group statistics (from :func:`grouped_moments`), ``scale =
    weight * r`` and ``shift = weight * d + bias``: ``weight`` and ``bias`` (C,), ``r`` and ``d``
    broadcasting like (G, 1, C, 1), each None when absent (1 or 0). The backward is batch
    norm's, through the statistics too, with the parameter gradients reduced to (C,) here (no
    autograd ops for the products). ``x_hat`` is saved instead of ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                r: Optional[Tensor], d: Optional[Tensor]) -> Tensor:
        x_hat = (x - mean).mul_(invstd)
        w4 = None if weight is None else weight.view(1, 1, -1, 1)
        b4 = None if bias is None else bias.view(1, 1, -1, 1)
        scale = _product(w4, r)
        if d is None:
            shift = b4
        elif w4 is None:
            shift = d if b4 is None else d + b4
        else:
            shift = w4 * d if b4 is None else torch.addcmul(b4, w4, d)
        ctx.save_for_backward(x_hat, invstd, scale, w4, r, d)
        if scale is None:
            return x_hat.clone() if shift is None else x_hat + shift
        return x_hat * scale if shift is None else torch.addcmul(shift, x_hat, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        x_hat, invstd, scale, w4, r, d = ctx.saved_tensors
        count = x_hat.shape[1] * x_hat.shape[3]  # values per channel and group
        sum_dy = dy.sum(dim=(1, 3), keepdim=True)
        sum_dy_xhat = (dy * x_hat).sum(dim=(1, 3), keepdim=True)
        # dx = scale * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
        dx = torch.addcmul(dy, x_hat, sum_dy_xhat, value=-1.0 / count).add_(sum_dy, alpha=-1.0 / count)
        dx.mul_(invstd if scale is None else scale * invstd)
        needs = ctx.needs_input_grad
        grad_weight = grad_bias = grad_r = grad_d = None
        if needs[3]:  # sum(dy * x_hat) * r + sum(dy) * d, over groups too
            per_group = _product(sum_dy_xhat, r)
            if d is not None:
                per_group = torch.addcmul(per_group, sum_dy, d)
            grad_weight = per_group.sum(dim=(0, 1, 3))
        if needs[4]:
            grad_bias = sum_dy.sum(dim=(0, 1, 3))
        if needs[5]:
            grad_r = _product(sum_dy_xhat, w4)
        if needs[6]:
            grad_d = _product(sum_dy, w4)
        return dx, None, None, grad_weight, grad_bias, grad_r, grad_d


def grouped_batch_norm(x4: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, r: Optional[Tensor] = None,
                       d: Optional[Tensor] = None) -> Tensor:
    """``(x4 - mean) * invstd * (weight * r) + (weight * d + bias)`` on a (G, B, C, S) view with
    (G, 1, C, 1) group statistics, (C,) ``weight``/``bias`` and ``r``/``d`` broadcasting like
    (G, 1, C, 1) (None: absent); returns the (G, B, C, S) output. Gradients as if the
    statistics were computed by autograd."""
    return _GroupBatchNorm.apply(x4, mean, invstd, weight, bias, r, d)


def group_batch_norm(x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Normalize each group of (N, C, *S) ``x`` with its (G, C) statistics, then ``* scale +
    shift`` per group and channel; gradients as if the statistics were computed by autograd."""
    shape = (mean.shape[0], 1, mean.shape[1], 1)
    return grouped_batch_norm(_grouped(x, mean.shape[0]), mean.view(shape), invstd.view(shape),
                              r=scale.view(shape), d=shift.view(shape)).reshape(x.shape)
