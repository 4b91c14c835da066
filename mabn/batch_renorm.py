"""Batch Renormalization.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
Models", NeurIPS 2017 (arXiv:1702.03275), Algorithm 1.

Training normalizes with the minibatch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
(``var_B`` biased) and corrects towards the running statistics with per-channel factors that
receive no gradient::

    sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1 / rmax_t, rmax_t)
    d = clip((mu_B - running_mean) / sigma, -dmax_t, dmax_t)
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias

When neither factor is clipped, ``y`` equals the inference output computed from the running
statistics. Evaluation is plain batch norm with the running statistics.

Running statistics (``momentum`` is the weight of the new value, as in ``nn.BatchNorm``)::

    running_mean += momentum * (mu_B - running_mean)
    std = sqrt(running_var)                        # eps is not inside the running std
    std += momentum * (sqrt(var_B_unbiased) - std)
    running_var = std ** 2

``running_var`` therefore stays an eps-free, unbiased (Bessel-corrected) variance estimate
with the same meaning as ``nn.BatchNorm``'s buffer; eps is added only where it is used.

Schedule, with ``t = num_batches_tracked`` read *before* the forward increments it (``t`` is
the number of updates already made)::

    rmax_t = 1 + (r_max - 1) * clamp((t - warmup_steps) / (r_ramp_end - warmup_steps), 0, 1)
    dmax_t =      d_max      * clamp((t - warmup_steps) / (d_ramp_end - warmup_steps), 0, 1)

So ``r = 1, d = 0`` (plain batch norm) while ``t <= warmup_steps``; the limits then grow
linearly and reach ``r_max`` at ``t = r_ramp_end`` and ``d_max`` at ``t = d_ramp_end``. A ramp
that ends at ``warmup_steps`` jumps to its maximum at ``t = warmup_steps``. The limits are
recomputed from the counter on every forward with tensor operations only (no host sync), so
the schedule keeps advancing under ``torch.compile``.

Normalization batch ``B`` (keyword-only, default None = the whole batch): with ``B`` set, a
training batch of N samples (``N % B == 0``) is split IN ORDER into ``G = N / B`` groups of ``B``
consecutive samples, the normalization batch inside a larger SGD batch (as MABN's
``split_batch=True`` and :class:`mabn.GhostBatchNorm2d`). Each group is renormalized with its own
``mu_B``, ``sigma_B`` and its own ``r``, ``d``, all computed against the same (pre-forward)
running statistics, exactly as if the layer were applied to each group separately from the same
state. The running statistics and the counter are then updated once per forward with the
average over groups::

    running_mean += momentum * (mean_g(mu_B) - running_mean)
    std += momentum * (mean_g(sqrt(var_B_unbiased)) - std)

Implementation: the output is ``x_hat * (weight * r) + (weight * d + bias)`` per group and
channel, computed by :func:`mabn.groups.grouped_batch_norm` (shared with ghost BN: no copy
of the input, per-group coefficients broadcast over its (G, B, C, S) view, batch norm's
backward written out, first order only); the schedule's limits are one affine map of the
counter and one clamp on cached constants;
``r`` and ``d`` are saved for the backward, never recomputed (:mod:`mabn.compile_barrier`).

Non-finite statistics (a NaN or inf in the input, or a variance that overflows) never enter the
running statistics: the whole update of that forward is skipped (``num_batches_tracked`` too, so
the schedule does not advance either) and counted in the 0-dim long buffer ``skipped_updates``,
without a host sync (:mod:`mabn.running_stats`). An empty batch returns an empty output and
leaves every buffer unchanged.

Statistics are computed in float32 for float16/bfloat16 inputs; the output has the input's
dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mabn.compile_barrier import saved_for_backward
from mabn.groups import cached_constant, check_group_size, check_norm_input, count_groups, grouped_batch_norm, \
    grouped_moments
from mabn.precision import statistics_dtype
from mabn.running_stats import FiniteRunningStats

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(FiniteRunningStats, _BatchNorm):
    """Batch Renormalization over dim 1; see the module docstring for the exact definition."""

    _expected_dims: Tuple[int, ...] = ()  # input ranks, set by each subclass

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_ramp_end: int = 40000,
        d_ramp_end: int = 25000,
        B: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if momentum is None or not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be a float in (0, 1], got {momentum!r}")
        if r_max < 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if d_max < 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        B = check_group_size(B, allow_none=True)
        for name, end in (("r_ramp_end", r_ramp_end), ("d_ramp_end", d_ramp_end)):
            if end < warmup_steps:
                raise ValueError(f"{name} must be >= warmup_steps ({warmup_steps}), got {end}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.r_ramp_end = int(r_ramp_end)
        self.d_ramp_end = int(d_ramp_end)
        self.B = B

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, r_ramp_end={self.r_ramp_end}, "
                f"d_ramp_end={self.d_ramp_end}" + ("" if self.B is None else f", B={self.B}"))

    def _limit_coefficients(self, end: int, low: float, high: float) -> Tuple[float, float, float, float]:
        """``(a, b, lower, upper)`` with ``limit_t = clamp(a * t + b, lower, upper)`` for the ramp
        from ``low`` at ``warmup_steps`` to ``high`` at ``end`` (either may be the larger); a ramp of length 0 (``end ==
        warmup_steps``) is the ramp of length 1 that ends there: for integer ``t`` a step from
        ``low`` to ``high`` at ``t = warmup_steps``."""
        start, span = (self.warmup_steps, end - self.warmup_steps) if end > self.warmup_steps \
            else (self.warmup_steps - 1, 1)
        slope = (high - low) / span
        return slope, low - slope * start, min(low, high), max(low, high)

    def _limits(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(rmax_t, dmax_t, -dmax_t)`` as a (3,) tensor: two dispatched ops on cached constants
        (one affine map of the counter and one clamp), no host sync."""
        coefficients = list(zip(self._limit_coefficients(self.r_ramp_end, 1.0, self.r_max),
                                self._limit_coefficients(self.d_ramp_end, 0.0, self.d_max),
                                self._limit_coefficients(self.d_ramp_end, 0.0, -self.d_max)))
        slope, offset, low, high = (
            cached_constant(("brn_limits", name, tuple(values), dtype), device,
                            lambda d, values=values: torch.tensor(values, dtype=dtype, device=d))
            for name, values in zip(("slope", "offset", "low", "high"), coefficients))
        return torch.clamp(torch.addcmul(offset, self.num_batches_tracked, slope), low, high)

    def _check_input_dim(self, input: Tensor) -> None:
        check_norm_input(type(self).__name__, self.num_features, self._expected_dims, input)

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """``(rmax_t, dmax_t)`` as 0-dim tensors for the current ``num_batches_tracked``."""
        rmax, dmax, _ = self._limits(statistics_dtype(self.running_mean.dtype), self.num_batches_tracked.device)
        return rmax, dmax

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        dtype = statistics_dtype(input.dtype)
        x = input.to(dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.training:
            out = self._train_forward(x, weight, bias)
        else:
            out = F.batch_norm(x, self.running_mean.to(dtype), self.running_var.to(dtype),
                               weight, bias, False, 0.0, self.eps)
        return out.to(input.dtype)

    def _train_forward(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """Renormalized output; updates the running statistics and the step counter.

        Everything per group and channel is shaped (G, 1, C, 1) and broadcasts over the
        (G, B, C, S) view of ``x`` (no copies); the running statistics enter as (C, 1) views."""
        groups = count_groups(type(self).__name__, self.B, x.shape[0])
        if x.numel() == 0:  # nothing to normalize; statistics and counters stay as they are
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        channels = x.shape[1]
        count = x.numel() // (channels * groups)  # values per channel in one group
        if count < 2:
            raise ValueError(f"{type(self).__name__} expects more than 1 value per channel when "
                             f"training, got input of shape {tuple(x.shape)}"
                             + ("" if self.B is None else f" split into groups of B={self.B}"))
        x4 = x.reshape(groups, -1, channels, count * groups // x.shape[0])
        mean_b, var_unbiased = grouped_moments(x4, correction=1)  # (G, 1, C, 1), no gradient
        eps = cached_constant(("eps", self.eps, x.dtype), x.device,
                              lambda d: torch.tensor(self.eps, dtype=x.dtype, device=d))
        sigma_b = torch.add(eps, var_unbiased, alpha=(count - 1) / count).sqrt_()  # biased variance + eps
        with torch.no_grad():
            running_mean = self.running_mean.to(x.dtype).view(channels, 1)
            running_std = torch.add(self.running_var.to(x.dtype).view(channels, 1), self.eps).sqrt_()
            rmax, dmax, dmin = self._limits(x.dtype, x.device)
            r = torch.clamp(sigma_b / running_std, rmax.reciprocal(), rmax)
            d = torch.clamp((mean_b - running_mean).div_(running_std), dmin, dmax)
            r, d = saved_for_backward(r, d)
            self._update_running_stats(mean_b, var_unbiased)
        # y = weight * (x_hat * r + d) + bias: per-group scale weight * r and shift
        # weight * d + bias; r and d are constants, so the gradient is the paper's.
        return grouped_batch_norm(x4, mean_b, sigma_b.reciprocal(), weight, bias, r, d).reshape(x.shape)

    def _update_running_stats(self, mean_b: Tensor, var_unbiased: Tensor) -> None:
        """EMA of the mean and of the (eps-free) standard deviation; advances the counter.

        ``mean_b`` and ``var_unbiased`` are (G, 1, C, 1) per-group statistics; the EMAs take
        their average over groups (of the means, and of the standard deviations). A non-finite
        result skips the whole update (see the module docstring).
        """
        mean = self.running_mean.to(mean_b.dtype).lerp(mean_b.mean(dim=(0, 1, 3)), self.momentum)
        std = self.running_var.to(mean_b.dtype).sqrt().lerp(var_unbiased.sqrt().mean(dim=(0, 1, 3)),
                                                             self.momentum)
        self._commit_running_stats(mean, std.square_())


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W) input."""

    _expected_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W) input."""

    _expected_dims = (5,)
