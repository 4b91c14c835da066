"""Normalization groups: ``B`` consecutive samples of a batch share their statistics.

MABN (``split_batch=True``), Batch Renormalization and ghost BN all simulate a small
normalization batch ``B`` inside a larger SGD batch. The checks live here once, and so do the
per-group statistics and the grouped batch norm (with its hand-written backward) that ghost BN
and Batch Renormalization share. Both work on the channels-last (G, B, S, C) view of an
(N, C, *S) input (:func:`grouped_view`, one ``as_strided``) with statistics shaped (G, 1, 1, C):
every per-group coefficient broadcasts over the view without a copy, and every per-channel
tensor (weight, bias, running statistics, all (C,)) broadcasts against the statistics without a
reshape. The statistics come with the deviations ``x_p - mean``, which the grouped batch norm
normalizes and saves: on the CPU they are the middle pass of a two-pass reduction (torch's
``var_mean`` is a scalar Welford loop there, tens of times slower than a mean and a sum; see
:func:`two_pass_statistics`), elsewhere one kernel after ``var_mean``. At tiny batches a
layer's cost is its number of dispatched ops (kernel launches on a GPU, and views count too),
and :func:`cached_constant` keeps constant tensors from costing one per call.
"""
from __future__ import annotations

import math

from collections import OrderedDict
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mabn.tracing import tracing

__all__ = ["cached_constant", "channel_moments", "check_group_size", "check_norm_input", "count_groups", "filled",
           "negative_zero", "scalar", "group_batch_norm", "group_statistics", "grouped_batch_norm", "grouped_moments",
           "grouped_view", "two_pass_statistics"]


_CONSTANTS: "OrderedDict[tuple, Tensor]" = OrderedDict()
_MAX_CONSTANTS = 256


def cached_constant(key: tuple, device: torch.device, build: Callable[[torch.device], Any]) -> Any:
    """``build(device)`` (a tensor, or a tuple of tensors), built once per ``key`` and device in eager
    mode (each build is a dispatched op, a kernel launch on a GPU, in every call otherwise). The
    tensors are read-only inputs of the kernels: never modify one. ``key`` must determine them
    (shapes, dtypes, values)."""
    if tracing(device):
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


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor of ``value`` (see :func:`cached_constant`): as an operand it costs
    less per op than a Python number, which every call wraps into a new tensor (the values are
    the same: the number is rounded to ``dtype`` either way)."""
    return cached_constant(("scalar", value, dtype), device, lambda d: torch.tensor(value, dtype=dtype, device=d))


def filled(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached (n,) tensor of ``value`` (see :func:`cached_constant`)."""
    return cached_constant(("full", n, value, dtype), device,
                           lambda d: torch.full((n,), value, dtype=dtype, device=d))


def negative_zero(dtype: torch.dtype, device: torch.device, shape: Tuple[int, ...] = ()) -> Tensor:
    """A cached tensor of ``-0.0`` (0-dim by default): the exact additive identity (``-0.0 + v ==
    v`` bit for bit, signed zeros included), the ``self`` of an ``addcmul`` that is to give a
    plain product. Shaped like the other operands, it keeps a ``_foreach`` op on CUDA's
    multi-tensor kernel (mixed shapes take one kernel per tensor there)."""
    return cached_constant(("negative_zero", tuple(shape), dtype), device,
                           lambda d: torch.full(shape, -0.0, dtype=dtype, device=d))


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


def _group_strides(t: Tensor, groups: int) -> Optional[List[int]]:
    """Strides of the (G, B, S, C) view of (N, C, *spatial) ``t``; None where its spatial dims
    do not merge into one."""
    spatial_stride, expected = 1, None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return None
        if expected is None:
            spatial_stride = stride
        expected = stride * size
    batch_stride = t.stride(0)
    return [batch_stride * (t.shape[0] // groups), batch_stride, spatial_stride, t.stride(1)]


def grouped_view(t: Tensor, groups: int) -> Tensor:
    """(N, C, *spatial) ``t`` as (G, B, S, C), channels last: one ``as_strided`` where the spatial
    dims merge, else a reshape (a copy only then) and a transpose; plain views while tracing."""
    shape = [groups, t.shape[0] // groups, math.prod(t.shape[2:]), t.shape[1]]
    strides = None if tracing(t.device) else _group_strides(t, groups)
    if strides is None:
        return t.reshape(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)
    return t.as_strided(shape, strides)


def _ungrouped_strides(t: Tensor, shape: torch.Size) -> Optional[List[int]]:
    """Strides of the (N, C, *spatial) ``shape`` view of a (G, B, S, C) tensor; None where groups
    and samples do not merge into one batch dim."""
    groups, per_group = t.shape[0], t.shape[1]
    group_stride, sample_stride, stride, channel_stride = t.stride()
    if groups > 1 and per_group > 1 and group_stride != sample_stride * per_group:
        return None
    spatial = []
    for size in reversed(shape[2:]):
        spatial.append(stride)
        stride *= size
    batch_stride = sample_stride if per_group > 1 else group_stride
    return [batch_stride, channel_stride, *reversed(spatial)]


def _ungrouped(t: Tensor, shape: torch.Size) -> Tensor:
    """The (N, C, *spatial) ``shape`` view of a (G, B, S, C) tensor: one ``as_strided`` where
    groups and samples merge into one batch dim, else a transpose and a reshape."""
    strides = None if tracing(t.device) else _ungrouped_strides(t, shape)
    if strides is None:
        return t.transpose(2, 3).reshape(shape)
    return t.as_strided(shape, strides)


def _output_like(x: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """A new tensor shaped like ``x`` (in its memory layout where that has a grouped view, else
    contiguous) and its (G, B, S, C) view, for kernels to write into."""
    if _group_strides(x, groups) is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty_like(x)
    return out, grouped_view(out, groups)


def two_pass_statistics(device: torch.device) -> bool:
    """Whether the statistics of an input on ``device`` are computed in two passes (the mean, then
    the sum of the squared deviations from it: as exact as Welford's for ``|mean| >> std``, which
    ``E[x^2] - mean^2`` is not) rather than by ``torch.var_mean``: on the CPU, where var_mean's
    Welford loop is not vectorized and takes tens of times as long as the two passes; elsewhere
    var_mean is one kernel and one read of the input."""
    return device.type == "cpu"


def _var_mean_moments(x_p: Tensor, correction: int) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`grouped_moments` in one ``var_mean`` kernel (Welford's) and the deviations."""
    var, mean = torch.var_mean(x_p, dim=(1, 2), correction=correction, keepdim=True)
    return mean, var, x_p - mean


def _two_pass_moments(x_p: Tensor, correction: int) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`grouped_moments` in two passes: the mean, the deviations from it, and the sum of
    their squares, each square divided by ``n - correction`` in the product's kernel."""
    mean = x_p.mean(dim=(1, 2), keepdim=True)
    xmu = x_p - mean
    scale = 1.0 / (x_p.shape[1] * x_p.shape[2] - correction)
    squares = torch.addcmul(negative_zero(x_p.dtype, x_p.device), xmu, xmu, value=scale)
    return mean, squares.sum(dim=(1, 2), keepdim=True), xmu


def grouped_moments(x_p: Tensor, correction: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, xmu)`` of each group and channel of a (G, B, S, C) view, without gradient:
    the mean and the variance (biased, or with Bessel's ``correction=1``), each (G, 1, 1, C)
    (broadcasting over the view and against (C,) tensors), and the deviations ``xmu = x_p -
    mean`` (G, B, S, C) that :func:`grouped_batch_norm` normalizes. On the CPU (see
    :func:`two_pass_statistics`) four kernels: a mean, the deviations, their scaled squares and
    the sum of these; elsewhere two: ``var_mean`` and the deviations."""
    with torch.no_grad():
        moments = _two_pass_moments if two_pass_statistics(x_p.device) else _var_mean_moments
        return moments(x_p, correction)


def _var_mean_channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`channel_moments` in one ``var_mean`` kernel."""
    var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    return mean, var


def _two_pass_channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`channel_moments` in torch's batch-norm statistics kernel for the CPU: a mean, then
    the sum of the squared deviations from it."""
    return torch.batch_norm_update_stats(x, None, None, 0.0)


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of each channel of (N, C, *S) ``x`` (the whole batch as one
    group), each (C,), without gradient, in one dispatched op: two passes on the CPU (see
    :func:`two_pass_statistics`), ``var_mean`` elsewhere."""
    with torch.no_grad():
        moments = _two_pass_channel_moments if two_pass_statistics(x.device) else _var_mean_channel_moments
        return moments(x)


def group_statistics(x: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Per-group, per-channel mean and biased variance of (N, C, *S) ``x``, each (G, C), from
    :func:`grouped_moments` on its grouped view (no copy for contiguous or channels-last
    input)."""
    with torch.no_grad():
        mean, var, _ = grouped_moments(grouped_view(x, groups))
    return mean.view(groups, -1), var.view(groups, -1)


def _coefficients(invstd: Tensor, invstd3: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  r: Optional[Tensor], d: Optional[Tensor], weighted: Optional[Tuple[Tensor, Tensor]]
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """``(k, k3, shift, ri)``: ``k = weight * r * invstd``, ``k3 = weight * r * invstd ** 3``,
    ``shift = weight * d + bias`` and ``ri = r * invstd`` (absent factors 1, absent terms 0;
    ``shift`` None where both are absent), in two dispatched ops at most, one where all of
    ``weight``, ``r`` and ``d`` are given with ``weighted``, ``(weight * invstd, weight * invstd
    ** 3)``."""
    if weight is not None and r is not None and d is not None and weighted is not None:
        zero = negative_zero(invstd.dtype, invstd.device)
        k, k3, shift, ri = torch._foreach_addcmul([zero, zero, zero if bias is None else bias, zero],
                                                  [r, r, weight, r], [*weighted, d, invstd])
        return k, k3, shift, ri
    if invstd3 is None:
        invstd3 = invstd.pow(3)
    ri, ri3 = (invstd, invstd3) if r is None else torch._foreach_mul([r, r], [invstd, invstd3])
    if weight is None:
        return ri, ri3, bias if d is None else d if bias is None else d + bias, ri
    if d is None:
        k, k3 = torch._foreach_mul([weight, weight], [ri, ri3])
        return k, k3, bias, ri
    zero = negative_zero(invstd.dtype, invstd.device)
    k, k3, shift = torch._foreach_addcmul([zero, zero, zero if bias is None else bias], [weight] * 3, [ri, ri3, d])
    return k, k3, shift, ri


def _affine(t: Tensor, scale: Tensor, shift: Optional[Tensor]) -> Tensor:
    """``t * scale + shift`` (``shift`` None: absent) in one kernel."""
    return torch.mul(t, scale) if shift is None else torch.addcmul(shift, t, scale)


class _GroupBatchNorm(torch.autograd.Function):
    """``y = x_hat * (weight * r) + (weight * d + bias)`` on (N, C, *S) ``x`` whose (G, B, S, C)
    deviations ``xmu`` from its (G, 1, 1, C) group means are given (from :func:`grouped_moments`),
    with ``x_hat = xmu * invstd``: ``weight`` and ``bias`` (C,), ``r`` and ``d`` broadcasting like
    (G, 1, 1, C), each None when absent (1 or 0); ``invstd3 = invstd ** 3`` and ``weight *
    invstd``, ``weight * invstd3`` may be given (see :func:`grouped_batch_norm`). The backward is
    batch norm's, through the statistics too, with the parameter gradients reduced to (C,) here
    (no autograd ops for the products).

    Forward: ``y = xmu * k + shift`` (one kernel on the input's size, its output reshaped in place
    into the layer's output) with ``k = weight * r * invstd`` and ``shift = weight * d + bias``
    (one or two ``_foreach`` ops for these, ``k3 = k * invstd ** 2`` and ``ri = r * invstd``);
    ``xmu`` is saved (not ``x`` or ``x_hat``). Backward, with ``n`` values per group and channel,
    ``sum_dy`` and ``sum_dm = sum(dy * xmu)`` (one product and two reductions)::

        dx = k * dy + xmu * P + Q,   P = -k3 * sum_dm / n,   Q = -k * sum_dy / n

    (two kernels on the input's size), ``P``, ``Q`` and the per-group terms of the parameter
    gradients in one ``_foreach_addcmul``."""

    @staticmethod
    def forward(ctx, x: Tensor, xmu: Tensor, invstd: Tensor, invstd3: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], r: Optional[Tensor], d: Optional[Tensor],
                weight_invstd: Optional[Tensor], weight_invstd3: Optional[Tensor]) -> Tensor:
        weighted = None if weight_invstd is None else (weight_invstd, weight_invstd3)
        k, k3, shift, ri = _coefficients(invstd, invstd3, weight, bias, r, d, weighted)
        ctx.save_for_backward(xmu, k, k3, ri, invstd, weight, d)
        ctx.shape = x.shape
        y_p = _affine(xmu, k, shift)  # a new tensor in the input's dimension order
        strides = None if tracing(x.device) else _ungrouped_strides(y_p, x.shape)
        if strides is not None:
            # reshaped in place: the output is no view (a view would forbid in-place ops on it)
            return y_p.as_strided_(x.shape, strides)
        out, out_p = _output_like(x, xmu.shape[0])
        out_p.copy_(y_p)  # Dynamo takes no as_strided_ (and no strided out= tensor)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        xmu, k, k3, ri, invstd, weight, d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x, need_weight, need_bias, need_r, need_d = needs[0], *needs[4:8]
        dy_p = grouped_view(dy, xmu.shape[0])
        count = xmu.shape[1] * xmu.shape[2]  # values per channel and group
        sum_dy = dy_p.sum(dim=(1, 2), keepdim=True)
        sum_dm = (dy_p * xmu).sum(dim=(1, 2), keepdim=True)
        # P, Q, and per group sum(dy * x_hat) * r (weight's) and sum(dy * x_hat) (r's)
        factors, values = [k3, k], [-1.0 / count, -1.0 / count]
        if need_weight:
            factors.append(ri)
            values.append(1.0)
        if need_r:
            factors.append(invstd)
            values.append(1.0)
        zero = negative_zero(xmu.dtype, xmu.device, sum_dm.shape)
        terms = torch._foreach_addcmul([zero] * len(factors), [sum_dm, sum_dy] + [sum_dm] * (len(factors) - 2),
                                       factors, values)
        dx = grad_weight = grad_bias = grad_r = grad_d = None
        if need_x:
            dx = _ungrouped(torch.addcmul(terms[1], xmu, terms[0]).addcmul_(dy_p, k), ctx.shape)
        if need_weight:  # sum(dy * x_hat) * r + sum(dy) * d, over groups too
            per_group = terms[2] if d is None else torch.addcmul(terms[2], sum_dy, d)
            grad_weight = per_group.sum(dim=(0, 1, 2))
        if need_bias:
            grad_bias = sum_dy.sum(dim=(0, 1, 2))
        if need_r:
            grad_r = terms[-1] if weight is None else terms[-1] * weight
        if need_d:
            grad_d = sum_dy if weight is None else sum_dy * weight
        return dx, None, None, None, grad_weight, grad_bias, grad_r, grad_d, None, None


def grouped_batch_norm(x: Tensor, xmu: Tensor, invstd: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, r: Optional[Tensor] = None, d: Optional[Tensor] = None, *,
                       invstd3: Optional[Tensor] = None, weighted: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``(x - mean) * invstd * (weight * r) + (weight * d + bias)`` per group of (N, C, *S) ``x``,
    given the (G, B, S, C) deviations ``xmu`` of its grouped view from the group means (as
    :func:`grouped_moments` returns them, made without gradient), (G, 1, 1, C) ``invstd``, (C,)
    ``weight``/``bias`` and ``r``/``d`` broadcasting like (G, 1, 1, C) (None: absent).
    ``invstd3`` (``invstd ** 3``) and ``weighted`` (``(weight * invstd, weight * invstd ** 3)``,
    used where ``weight``, ``r`` and ``d`` are all given) save ops where the caller has them
    (None: computed here where needed). Returns a new tensor shaped like ``x``. Gradients as if
    the statistics were computed by autograd."""
    weight_invstd, weight_invstd3 = (None, None) if weighted is None else weighted
    return _GroupBatchNorm.apply(x, xmu, invstd, invstd3, weight, bias, r, d, weight_invstd, weight_invstd3)


def group_batch_norm(x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Normalize each group of (N, C, *S) ``x`` with its (G, C) statistics, then ``* scale +
    shift`` per group and channel; gradients as if the statistics were computed by autograd."""
    shape = (mean.shape[0], 1, 1, mean.shape[1])
    with torch.no_grad():
        xmu = grouped_view(x, mean.shape[0]) - mean.view(shape)
    return grouped_batch_norm(x, xmu, invstd.view(shape), r=scale.view(shape), d=shift.view(shape))
