"""Normalization groups: ``B`` consecutive samples of a batch share their statistics.

MABN (``split_batch=True``), Batch Renormalization and ghost BN all simulate a small
normalization batch ``B`` inside a larger SGD batch. The checks live here once, and so do the
per-group statistics and the grouped batch norm (with its hand-written backward) that ghost BN
and Batch Renormalization share.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["check_group_size", "count_groups", "group_batch_norm", "group_statistics"]


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


def group_statistics(x: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Per-group, per-channel mean and biased variance of (N, C, *S) ``x``, each (G, C).

    Two passes over each (sample, channel) row of the ``(N * C, prod(S))`` view (no copy for
    contiguous input): the row mean, then the norm of the centered row (both vectorized, several
    times faster on CPU than torch's batch-norm statistics kernel). The rows of a group are then
    combined exactly (law of total variance): the mean of the row means, and the mean of the row
    variances plus the variance of the row means.
    """
    batch, channels = x.shape[:2]
    with torch.no_grad():
        rows = x.reshape(batch * channels, -1)
        row_mean = rows.mean(dim=1, keepdim=True)
        row_var = torch.linalg.vector_norm(rows - row_mean, dim=1).square()
        between, mean = torch.var_mean(row_mean.view(groups, -1, channels), dim=1, correction=0)
        within = row_var.view(groups, -1, channels).mean(dim=1)
        return mean, torch.add(between, within, alpha=1 / rows.shape[1])


class _GroupBatchNorm(torch.autograd.Function):
    """``y = (x - mean) * invstd * scale + shift`` on (G, B, C, S) ``x`` with (G, C) coefficients,
    where ``mean`` and ``invstd`` are the group statistics of ``x`` (from
    :func:`group_statistics`): the backward is batch norm's, through the statistics too."""

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        shape = (x.shape[0], 1, x.shape[2], 1)
        alpha = scale * invstd
        beta = torch.addcmul(shift, alpha, mean, value=-1)
        ctx.save_for_backward(x, mean, invstd, scale)
        # multiply, then add in place: torch's addcmul with a broadcast first operand is slower
        return (x * alpha.view(shape)).add_(beta.view(shape))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, mean, invstd, scale = ctx.saved_tensors
        groups, batch, channels = x.shape[:3]
        count = batch * x.shape[3]  # values per channel and group

        def per_row(stat: Tensor) -> Tensor:
            return stat.unsqueeze(1).expand(groups, batch, channels).reshape(-1)

        # torch's batch-norm backward reduction per (sample, channel) row: sum(dy * x_hat), sum(dy);
        # the weight only sets the dtype of the sums (no input gradient is asked for), but the
        # CUDA kernel needs one whenever a weight or bias gradient is requested
        rows = (1, groups * batch * channels, -1)
        row_invstd = per_row(invstd)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.reshape(rows), x.reshape(rows), row_invstd, None, None, per_row(mean), row_invstd,
            True, 0.0, [False, True, True])
        sum_dy_xhat = sum_dy_xhat.view(groups, batch, channels).sum(dim=1)
        sum_dy = sum_dy.view(groups, batch, channels).sum(dim=1)
        # dx = scale * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) = a * dy + b * x + c
        a = scale * invstd
        b = (a * invstd * sum_dy_xhat).mul_(-1 / count)
        c = torch.addcmul(b * mean, a, sum_dy, value=1 / count).neg_()
        shape = (groups, 1, channels, 1)
        dx = (dy * a.view(shape)).addcmul_(x, b.view(shape)).add_(c.view(shape))
        return dx, None, None, sum_dy_xhat, sum_dy


def group_batch_norm(x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Normalize each group of (N, C, *S) ``x`` with its (G, C) statistics, then ``* scale +
    shift`` per group and channel; gradients as if the statistics were computed by autograd."""
    return _GroupBatchNorm.apply(_grouped(x, mean.shape[0]), mean, invstd, scale, shift).reshape(x.shape)
