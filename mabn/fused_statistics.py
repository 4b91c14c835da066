"""MABN's per-channel bookkeeping as one Triton kernel per pass (opt-in: ``fused_statistics=True``).

On a small map a MABN layer spends most of its step on per-channel bookkeeping: some twenty
(one group) to forty (``split_batch``, several groups) tiny ops on (C,), (G, C) and (W, C)
tensors, each a kernel launch on a GPU. Here each pass runs it as one kernel.

One group per forward (``split_batch=False``, the detection protocol; the window is a ring):

* forward: write the group's second moment ``chi`` into its ring row (finite channels only),
  average the ring, clamp ``running_var + eps`` to ``(chi + eps) * [1 / r_max^2, r_max^2]``, move
  ``running_var`` towards the statistic, advance ``num_batches_tracked`` and ``groups_seen`` and
  count the skipped channels in ``skipped_updates``;
* backward: form ``psi`` from BN's weight-gradient reduction, write it into its ring row (finite
  channels only), average the ring and return the input-gradient coefficient ``psi / (chi + eps)``.

Several groups per forward (``split_batch=True``; the window shifts, oldest row first): the same
per group, each group's moving average taken over the W values of the stream (window, then the
forward's groups) that end at it, ``running_var`` moved towards the groups' mean, the window
shifted by G rows where that mean (forward) or every group's ``psi`` (backward) is finite; the
backward kernel also sums BN's per-sample reductions into the weight and bias gradients.

The schedule (which groups use their own statistic, renormalization on) is decided on the host,
as in the eager path. The kernels run on CUDA, and on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``), which is how the test suite checks them against the eager path. One
program handles every channel: (C,) work is small, and with one program each counter is advanced
by a single thread, with no ordering between programs to arrange. The kernels index rows and
channels directly, so the tensors they get must be contiguous (the layer's buffers are).

This module imports Triton; :mod:`mabn.moving_average_bn` imports it only for a layer built with
``fused_statistics=True`` whose input is on a device Triton runs on.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.graph import increment_version

__all__ = ["backward_coefficient", "forward_statistics", "grouped_backward", "grouped_forward_statistics"]

# Channels per loop step: at least one per thread of the default 4 warps, so that no element is
# held by two threads (a kernel reads back rows it wrote), and at most 1024.
_MIN_BLOCK, _MAX_BLOCK = 128, 1024


def _block(channels: int) -> int:
    return min(max(triton.next_power_of_2(channels), _MIN_BLOCK), _MAX_BLOCK)


def _current_device(tensor: Tensor) -> ContextManager:
    """Triton launches on the current CUDA device: make it ``tensor``'s where it is another one."""
    if tensor.device.type != "cuda" or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _check_contiguous(**tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"MABN's fused statistics kernels index {name} as a contiguous tensor, but it has strides "
                             f"{tensor.stride()}; make the layer's buffers contiguous or use fused_statistics=False")


def _modified(*tensors: Tensor) -> None:
    """Bump the version counters of tensors a kernel wrote in place, as torch's in-place ops do
    (autograd's saved-tensor checks and :class:`mabn.host_counters.HostCounters` read them)."""
    for tensor in tensors:
        increment_version(tensor)


@triton.jit
def _clamp(values, low, high):
    """``torch.clamp(values, low, high)`` for tensor bounds: a NaN value or bound gives NaN."""
    values = tl.where((values < low) | (low != low), low, values)
    return tl.where((values > high) | (high != high), high, values)


@triton.jit
def _variance(running_var, eps, chi_plus_eps, low_factor, high_factor, R_ON: tl.constexpr):
    """The forward's ``var = (chi + eps) / r ** 2``: ``running_var + eps`` clamped to
    ``(chi + eps) * [low_factor, high_factor]`` once renormalization is on (``R_ON``), else
    ``chi + eps``."""
    if R_ON:
        var = _clamp(running_var.to(chi_plus_eps.dtype) + eps, chi_plus_eps * low_factor, chi_plus_eps * high_factor)
    else:
        var = chi_plus_eps
    return var


@triton.jit
def _move_running_var(running_var_ptr, running_var, target, ema_weight, finite, offsets, mask):
    """``running_var.lerp_(target, ema_weight)`` (torch's two-sided form, in the buffer's dtype)
    in the ``finite`` channels."""
    target = target.to(running_var.dtype)
    difference = target - running_var
    moved = tl.where(ema_weight < 0.5, running_var + ema_weight * difference, target - difference * (1.0 - ema_weight))
    tl.store(running_var_ptr + offsets, tl.where(finite, moved, running_var), mask=mask)


@triton.jit
def _advance_counters(forwards_ptr, groups_seen_ptr, skipped_ptr, groups, skipped):
    """One forward, ``groups`` groups, and the channels counted in ``skipped``: scalar atomics,
    each run once per program (by one thread of it)."""
    tl.atomic_add(forwards_ptr, 1)
    tl.atomic_add(groups_seen_ptr, groups)
    tl.atomic_add(skipped_ptr, tl.sum(skipped, axis=0))


@triton.jit
def _ring_average(window_ptr, new_row, offsets, mask, channels, slot, rows: tl.constexpr):
    """Mean over the ``rows`` ring rows with row ``slot`` replaced by ``new_row`` (read from
    registers, so no row is read back after it is written)."""
    total = tl.zeros_like(new_row)
    for row in range(rows):
        values = tl.load(window_ptr + row * channels + offsets, mask=mask, other=0.0).to(new_row.dtype)
        total += tl.where(row == slot, new_row, values)
    return total / rows


@triton.jit
def _ring_statistic(window_ptr, values, offsets, mask, channels, slot, rows: tl.constexpr, USE_OWN: tl.constexpr):
    """Write ``values`` into ring row ``slot`` where they are finite; return that finite mask and
    the statistic to use: ``values`` themselves (``USE_OWN``) or the mean of the updated ring."""
    finite = tl.abs(values) < float("inf")
    row = window_ptr + slot * channels + offsets
    new_row = tl.where(finite, values, tl.load(row, mask=mask, other=0.0).to(values.dtype))
    tl.store(row, new_row, mask=mask)
    if USE_OWN:
        used = values
    else:
        used = _ring_average(window_ptr, new_row, offsets, mask, channels, slot, rows)
    return finite, used


@triton.jit(do_not_specialize=["slot"])
def _mabn_forward_statistics_kernel(chi_ptr, window_ptr, running_var_ptr, eps_ptr, low_ptr, high_ptr, ema_weight_ptr,
                                    forwards_ptr, groups_seen_ptr, skipped_ptr, var_ptr, chi_plus_eps_ptr, channels,
                                    slot, rows: tl.constexpr, USE_OWN: tl.constexpr, R_ON: tl.constexpr,
                                    BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    eps = tl.load(eps_ptr)
    ema_weight = tl.load(ema_weight_ptr)
    skipped = tl.zeros([BLOCK], dtype=tl.int64)
    for start in tl.range(0, channels, BLOCK):
        offsets = start + lanes
        mask = offsets < channels
        chi = tl.load(chi_ptr + offsets, mask=mask, other=0.0)
        finite, used = _ring_statistic(window_ptr, chi, offsets, mask, channels, slot, rows, USE_OWN)
        chi_plus_eps = used + eps
        running_var = tl.load(running_var_ptr + offsets, mask=mask, other=1.0)
        low_factor = tl.load(low_ptr + offsets, mask=mask, other=1.0)
        high_factor = tl.load(high_ptr + offsets, mask=mask, other=1.0)
        var = _variance(running_var, eps, chi_plus_eps, low_factor, high_factor, R_ON)
        _move_running_var(running_var_ptr, running_var, used, ema_weight, finite, offsets, mask)
        tl.store(var_ptr + offsets, var, mask=mask)
        tl.store(chi_plus_eps_ptr + offsets, chi_plus_eps, mask=mask)
        skipped += (mask & (finite == 0)).to(tl.int64)
    _advance_counters(forwards_ptr, groups_seen_ptr, skipped_ptr, 1, skipped)


@triton.jit(do_not_specialize=["count", "slot"])
def _mabn_backward_coefficient_kernel(grad_weight_ptr, weight_ptr, scale_ptr, chi_plus_eps_ptr, window_ptr,
                                      coefficient_ptr, channels, count, slot, rows: tl.constexpr,
                                      USE_OWN: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for start in tl.range(0, channels, BLOCK):
        offsets = start + lanes
        mask = offsets < channels
        grad_weight = tl.load(grad_weight_ptr + offsets, mask=mask, other=0.0)
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(grad_weight.dtype)
        if SCALED:
            scale = tl.load(scale_ptr).to(grad_weight.dtype)
            weight = weight / scale
        psi = grad_weight * weight / count
        _, used = _ring_statistic(window_ptr, psi, offsets, mask, channels, slot, rows, USE_OWN)
        coefficient = used / tl.load(chi_plus_eps_ptr + offsets, mask=mask, other=1.0)
        if SCALED:
            coefficient = coefficient * scale
        tl.store(coefficient_ptr + offsets, coefficient, mask=mask)


@triton.jit
def _stream_average(window_ptr, values_ptr, offsets, mask, channels, group, dtype: tl.constexpr,
                    rows: tl.constexpr):
    """Mean of rows ``group + 1 .. group + rows`` of the stream ``window`` (``rows`` rows, oldest
    first) followed by ``values`` (one row per group): the moving average ending at ``group``."""
    total = tl.zeros(offsets.shape, dtype=dtype)
    for step in range(1, rows + 1):
        index = group + step
        in_window = index < rows
        old = tl.load(window_ptr + index * channels + offsets, mask=mask & in_window, other=0.0)
        new = tl.load(values_ptr + (index - rows) * channels + offsets, mask=mask & (index >= rows), other=0.0)
        total += tl.where(in_window, old.to(dtype), new.to(dtype))
    return total / rows


@triton.jit
def _shift_window(window_ptr, values_ptr, finite, offsets, mask, channels, rows: tl.constexpr,
                  GROUPS: tl.constexpr):
    """Append the ``GROUPS`` rows of ``values`` to the window, dropping its oldest rows, in the
    channels that are ``finite``. Row ``i`` takes stream row ``GROUPS + i``: rows in ascending
    order, so every window row is read before it is written."""
    for row in range(rows):
        index = GROUPS + row
        in_window = index < rows
        kept = tl.load(window_ptr + index * channels + offsets, mask=mask & in_window, other=0.0)
        new = tl.load(values_ptr + (index - rows) * channels + offsets, mask=mask & (index >= rows), other=0.0)
        old = tl.load(window_ptr + row * channels + offsets, mask=mask, other=0.0)
        shifted = tl.where(in_window, kept, new.to(kept.dtype))
        tl.store(window_ptr + row * channels + offsets, tl.where(finite, shifted, old), mask=mask)


@triton.jit(do_not_specialize=["own_groups"])
def _mabn_grouped_forward_kernel(chi_ptr, window_ptr, running_var_ptr, eps_ptr, low_ptr, high_ptr, ema_weight_ptr,
                                 forwards_ptr, groups_seen_ptr, skipped_ptr, u_ptr, chi_plus_eps_ptr, channels,
                                 own_groups, rows: tl.constexpr, GROUPS: tl.constexpr, R_ON: tl.constexpr,
                                 BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    eps = tl.load(eps_ptr)
    ema_weight = tl.load(ema_weight_ptr)
    skipped = tl.zeros([BLOCK], dtype=tl.int64)
    for start in tl.range(0, channels, BLOCK):
        offsets = start + lanes
        mask = offsets < channels
        running_var = tl.load(running_var_ptr + offsets, mask=mask, other=1.0)
        low_factor = tl.load(low_ptr + offsets, mask=mask, other=1.0)
        high_factor = tl.load(high_ptr + offsets, mask=mask, other=1.0)
        target = tl.zeros([BLOCK], dtype=eps.dtype)
        for group in range(GROUPS):
            chi = tl.load(chi_ptr + group * channels + offsets, mask=mask, other=0.0)
            average = _stream_average(window_ptr, chi_ptr, offsets, mask, channels, group, chi.dtype, rows)
            used = tl.where(group < own_groups, chi, average)
            target += used
            chi_plus_eps = used + eps
            var = _variance(running_var, eps, chi_plus_eps, low_factor, high_factor, R_ON)
            tl.store(u_ptr + group * channels + offsets, tl.rsqrt(var), mask=mask)
            tl.store(chi_plus_eps_ptr + group * channels + offsets, chi_plus_eps, mask=mask)
        target = target / GROUPS
        finite = tl.abs(target) < float("inf")
        _shift_window(window_ptr, chi_ptr, finite, offsets, mask, channels, rows, GROUPS)
        _move_running_var(running_var_ptr, running_var, target, ema_weight, finite, offsets, mask)
        skipped += (mask & (finite == 0)).to(tl.int64)
    _advance_counters(forwards_ptr, groups_seen_ptr, skipped_ptr, GROUPS, skipped)


@triton.jit(do_not_specialize=["count", "own_groups"])
def _mabn_grouped_backward_kernel(products_ptr, sums_ptr, u_ptr, weight_ptr, scale_ptr, chi_plus_eps_ptr, window_ptr,
                                  psi_ptr, coefficient_ptr, grad_weight_ptr, grad_bias_ptr, channels, count,
                                  own_groups, rows: tl.constexpr, GROUPS: tl.constexpr, SAMPLES: tl.constexpr,
                                  SCALED: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for start in tl.range(0, channels, BLOCK):
        offsets = start + lanes
        mask = offsets < channels
        grad_weight = tl.zeros([BLOCK], dtype=grad_weight_ptr.dtype.element_ty)
        grad_bias = tl.zeros([BLOCK], dtype=grad_weight_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(grad_weight.dtype)
        if SCALED:
            scale = tl.load(scale_ptr).to(grad_weight.dtype)
            weight = weight / scale
        finite = tl.full([BLOCK], 1, tl.int1)
        for group in range(GROUPS):
            product = tl.zeros([BLOCK], dtype=grad_weight.dtype)
            for sample in range(SAMPLES):
                row = (group * SAMPLES + sample) * channels + offsets
                product += tl.load(products_ptr + row, mask=mask, other=0.0)
                grad_bias += tl.load(sums_ptr + row, mask=mask, other=0.0)
            per_group = product * tl.load(u_ptr + group * channels + offsets, mask=mask, other=0.0)
            grad_weight += per_group
            psi = per_group * weight / count
            finite = finite & (tl.abs(psi) < float("inf"))
            tl.store(psi_ptr + group * channels + offsets, psi, mask=mask)
        tl.store(grad_weight_ptr + offsets, grad_weight, mask=mask)
        tl.store(grad_bias_ptr + offsets, grad_bias, mask=mask)
        for group in range(GROUPS):
            psi = tl.load(psi_ptr + group * channels + offsets, mask=mask, other=0.0)
            average = _stream_average(window_ptr, psi_ptr, offsets, mask, channels, group, psi.dtype, rows)
            coefficient = tl.where(group < own_groups, psi, average) / tl.load(
                chi_plus_eps_ptr + group * channels + offsets, mask=mask, other=1.0)
            if SCALED:
                coefficient = coefficient * scale
            tl.store(coefficient_ptr + group * channels + offsets, coefficient, mask=mask)
        _shift_window(window_ptr, psi_ptr, finite, offsets, mask, channels, rows, GROUPS)


def forward_statistics(chi: Tensor, window: Tensor, running_var: Tensor, eps: Tensor,
                       clamp_factors: Sequence[Tensor], ema_weight: Tensor, counters: Sequence[Tensor], slot: int,
                       use_own: bool, r_on: bool) -> Tuple[Tensor, Tensor]:
    """One forward's statistics of a one-group ring layer; advances ``window`` (row ``slot``),
    ``running_var`` and ``counters`` (``num_batches_tracked``, ``groups_seen``,
    ``skipped_updates``) in place and returns ``var`` (the forward's variance) and ``chi + eps``,
    (C,) in the dtype of ``chi``. ``eps`` and ``ema_weight`` are 0-dim tensors, ``clamp_factors``
    the (C,) lower and upper factors of the clamp."""
    _check_contiguous(chi=chi, window=window, running_var=running_var)
    channels = chi.shape[0]
    var, chi_plus_eps = torch.empty_like(chi), torch.empty_like(chi)
    with _current_device(chi):
        _mabn_forward_statistics_kernel[(1,)](
            chi, window, running_var, eps, *clamp_factors, ema_weight, *counters, var, chi_plus_eps, channels, slot,
            rows=window.shape[0], USE_OWN=use_own, R_ON=r_on, BLOCK=_block(channels))
    _modified(window, running_var, *counters)
    return var, chi_plus_eps


def backward_coefficient(grad_weight: Tensor, weight: Tensor, grad_scale: Optional[Tensor], chi_plus_eps: Tensor,
                         window: Tensor, count: int, slot: int, use_own: bool) -> Tensor:
    """The (C,) input-gradient coefficient ``psi_used / (chi + eps)`` of one backward of a one-group
    ring layer, with ``psi = grad_weight * weight / (grad_scale * count)`` written into row ``slot``
    of ``window`` (finite channels only) and multiplied back by ``grad_scale``."""
    _check_contiguous(grad_weight=grad_weight, weight=weight, chi_plus_eps=chi_plus_eps, window=window)
    channels = grad_weight.shape[0]
    coefficient = torch.empty_like(grad_weight)
    with _current_device(grad_weight):
        _mabn_backward_coefficient_kernel[(1,)](
            grad_weight, weight, grad_weight if grad_scale is None else grad_scale, chi_plus_eps, window, coefficient,
            channels, count, slot, rows=window.shape[0], USE_OWN=use_own, SCALED=grad_scale is not None,
            BLOCK=_block(channels))
    _modified(window)
    return coefficient


def grouped_forward_statistics(chi: Tensor, window: Tensor, running_var: Tensor, eps: Tensor,
                               clamp_factors: Sequence[Tensor], ema_weight: Tensor, counters: Sequence[Tensor],
                               own_groups: int, r_on: bool) -> Tuple[Tensor, Tensor]:
    """One forward's statistics of a ``split_batch`` layer with G > 1 groups: ``chi`` (G, C) is each
    group's second moment. Shifts the G values into ``window`` (oldest first; finite channels only),
    advances ``running_var`` and ``counters`` in place and returns ``u = 1 / sqrt(var)`` and
    ``chi + eps``, (G, C). The first ``own_groups`` groups use their own statistic."""
    _check_contiguous(chi=chi, window=window, running_var=running_var)
    groups, channels = chi.shape
    u, chi_plus_eps = torch.empty_like(chi), torch.empty_like(chi)
    with _current_device(chi):
        _mabn_grouped_forward_kernel[(1,)](
            chi, window, running_var, eps, *clamp_factors, ema_weight, *counters, u, chi_plus_eps, channels,
            own_groups, rows=window.shape[0], GROUPS=groups, R_ON=r_on, BLOCK=_block(channels))
    _modified(window, running_var, *counters)
    return u, chi_plus_eps


def grouped_backward(products: Tensor, sums: Tensor, u: Tensor, weight: Tensor, grad_scale: Optional[Tensor],
                     chi_plus_eps: Tensor, window: Tensor, count: int, own_groups: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """The weight and bias gradients, (C,), and the input-gradient coefficients ``psi_used / (chi +
    eps)``, (G, C), of one backward of a ``split_batch`` layer from the per-sample reductions
    ``products = sum(dy * x)`` and ``sums = sum(dy)``, flat (N * C,) in (sample, channel) order;
    shifts the groups' ``psi`` into
    ``window`` (all finite channels only)."""
    _check_contiguous(products=products, sums=sums, u=u, weight=weight, chi_plus_eps=chi_plus_eps, window=window)
    groups, channels = u.shape
    psi, coefficient = torch.empty_like(u), torch.empty_like(u)
    grad_weight, grad_bias = products.new_empty(channels), products.new_empty(channels)
    with _current_device(u):
        _mabn_grouped_backward_kernel[(1,)](
            products, sums, u, weight, u if grad_scale is None else grad_scale, chi_plus_eps, window, psi,
            coefficient, grad_weight, grad_bias, channels, count, own_groups, rows=window.shape[0], GROUPS=groups,
            SAMPLES=products.numel() // (groups * channels), SCALED=grad_scale is not None, BLOCK=_block(channels))
    _modified(window)
    return grad_weight, grad_bias, coefficient
