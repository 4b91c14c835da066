"""MABN's per-channel bookkeeping as one Triton kernel per pass (opt-in: ``fused_statistics=True``).

A ``split_batch=False`` MABN layer (one normalization group per forward, the detection protocol)
spends most of a small-map step on per-channel bookkeeping: about twenty tiny element-wise ops
on (C,) and (W, C) tensors, each a kernel launch on a GPU. Here each pass runs it as one kernel:

* forward: write the group's second moment ``chi`` into its ring row (finite channels only),
  average the ring, clamp ``running_var + eps`` to ``(chi + eps) * [1 / r_max^2, r_max^2]``, move
  ``running_var`` towards the statistic, advance ``num_batches_tracked`` and ``groups_seen`` and
  count the skipped channels in ``skipped_updates``;
* backward: form ``psi`` from BN's weight-gradient reduction, write it into its ring row (finite
  channels only), average the ring and return the input-gradient coefficient ``psi / (chi + eps)``.

The schedule (own statistic or window average, renormalization on) is decided on the host, as
in the eager path. The kernels run on CUDA, and on CPU tensors when Triton's interpreter is on
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

__all__ = ["backward_coefficient", "forward_statistics"]

_MAX_BLOCK = 1024


def _block(channels: int) -> int:
    return min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK)


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
    for start in range(0, channels, BLOCK):
        offsets = start + lanes
        mask = offsets < channels
        chi = tl.load(chi_ptr + offsets, mask=mask, other=0.0)
        finite, used = _ring_statistic(window_ptr, chi, offsets, mask, channels, slot, rows, USE_OWN)
        chi_plus_eps = used + eps
        running_var = tl.load(running_var_ptr + offsets, mask=mask, other=1.0)
        if R_ON:
            low = chi_plus_eps * tl.load(low_ptr + offsets, mask=mask, other=1.0)
            high = chi_plus_eps * tl.load(high_ptr + offsets, mask=mask, other=1.0)
            var = running_var.to(chi.dtype) + eps
            var = tl.where(var < low, low, var)
            var = tl.where(var > high, high, var)
        else:
            var = chi_plus_eps
        # torch.lerp's two-sided form, in the buffer's dtype
        target = used.to(running_var.dtype)
        difference = target - running_var
        moved = tl.where(ema_weight < 0.5, running_var + ema_weight * difference,
                         target - difference * (1.0 - ema_weight))
        tl.store(running_var_ptr + offsets, tl.where(finite, moved, running_var), mask=mask)
        tl.store(var_ptr + offsets, var, mask=mask)
        tl.store(chi_plus_eps_ptr + offsets, chi_plus_eps, mask=mask)
        skipped += (mask & (finite == 0)).to(tl.int64)
    # a scalar atomic runs once per program (one thread of it)
    tl.atomic_add(forwards_ptr, 1)
    tl.atomic_add(groups_seen_ptr, 1)
    tl.atomic_add(skipped_ptr, tl.sum(skipped, axis=0))


@triton.jit(do_not_specialize=["count", "slot"])
def _mabn_backward_coefficient_kernel(grad_weight_ptr, weight_ptr, scale_ptr, chi_plus_eps_ptr, window_ptr,
                                      coefficient_ptr, channels, count, slot, rows: tl.constexpr,
                                      USE_OWN: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for start in range(0, channels, BLOCK):
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
