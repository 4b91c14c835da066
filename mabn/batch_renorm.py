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
channel. With one group (``B`` None or equal to the batch) that is torch's batch-norm kernel
with scale ``weight * r`` and shift ``weight * d + bias``: one ``native_batch_norm`` call forward
in inference mode on the batch statistics already computed (one pass over the input, no second
reduction), one ``native_batch_norm_backward`` call backward in training mode on the same
statistics (the gradient through them). With several groups it is
:func:`mabn.groups.grouped_batch_norm` (shared with ghost BN: no copy of the input, per-group
coefficients broadcast over its channels-last (G, B, S, C) view, batch norm's backward written
out, first order only). The batch statistics (mean and biased variance) come from
:func:`mabn.groups.channel_moments` or :func:`mabn.groups.grouped_moments`: ``var_mean`` on a
GPU, two passes (a mean, then the squared deviations from it) on the CPU, where var_mean is
slow. Either way the statistics broadcast against the (C,) running statistics as they are. A
step's per-channel arithmetic is a few ``_foreach`` ops: one ``_foreach_addcmul`` for ``sigma_B
** 2``, the unbiased variance, ``sigma ** 2``, ``mu_B - running_mean`` and the schedule's affine
map of the counter (then one clamp on cached constants gives the limits), one ``_foreach_pow``
for every square root (``sigma_B``, ``sigma``, the two standard deviations of the update; with
several groups also ``1 / sigma_B`` and ``sigma_B ** 3``, or ``sigma_B ** -3`` without weight)
and ``1 / rmax_t``, one ``_foreach_div`` for ``r`` and ``d`` before clipping (with several groups
also the weight over ``sigma_B`` and ``sigma_B ** 3``), the two EMAs one ``_foreach_lerp``; ``r``
and ``d`` are saved for the backward, never recomputed (:mod:`mabn.compile_barrier`). A training
forward + backward dispatches 25 ops with one group and 38 with four on a GPU, 40 with four on
the CPU (the two-pass statistics' mean and sum of squares; the autograd engine's three gradient
accumulations included).

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
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from mabn.compile_barrier import saved_for_backward
from mabn.groups import (cached_constant, channel_moments, check_group_size, check_norm_input, count_groups,
                         grouped_batch_norm, grouped_moments, grouped_view, negative_zero, scalar)
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

    def _limit_constants(self, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(slope, offset, low, high)``, cached (3,) tensors with ``(rmax_t, dmax_t, -dmax_t) =
        clamp(offset + t * slope, low, high)``."""
        coefficients = list(zip(self._limit_coefficients(self.r_ramp_end, 1.0, self.r_max),
                                self._limit_coefficients(self.d_ramp_end, 0.0, self.d_max),
                                self._limit_coefficients(self.d_ramp_end, 0.0, -self.d_max)))
        return tuple(cached_constant(("brn_limits", name, tuple(values), dtype), device,
                                     lambda d, values=values: torch.tensor(values, dtype=dtype, device=d))
                     for name, values in zip(("slope", "offset", "low", "high"), coefficients))

    def _limits(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``(rmax_t, dmax_t, -dmax_t)`` as a (3,) tensor: two dispatched ops on cached constants
        (one affine map of the counter and one clamp), no host sync."""
        slope, offset, low, high = self._limit_constants(dtype, device)
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

        One group goes through torch's batch-norm kernels (one forward and one backward call),
        several through :func:`mabn.groups.grouped_batch_norm` on the deviations of the (G, B,
        S, C) view of ``x`` from its group means, with statistics shaped (G, 1, 1, C); either way
        every per-channel tensor broadcasts against the statistics as it is."""
        groups = count_groups(type(self).__name__, self.B, x.shape[0])
        if x.numel() == 0:  # nothing to normalize; statistics and counters stay as they are
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        count = x.numel() // (x.shape[1] * groups)  # values per channel in one group
        if count < 2:
            raise ValueError(f"{type(self).__name__} expects more than 1 value per channel when "
                             f"training, got input of shape {tuple(x.shape)}"
                             + ("" if self.B is None else f" split into groups of B={self.B}"))
        with torch.no_grad():
            if groups == 1:
                mean_b, var_biased = channel_moments(x)  # (C,)
            else:
                mean_b, var_biased, xmu = grouped_moments(grouped_view(x, groups))  # (G, 1, 1, C), x_p - mean
            r, d, grouped = self._factors(mean_b, var_biased, count, weight)
        # y = weight * (x_hat * r + d) + bias: per-group scale weight * r and shift
        # weight * d + bias; r and d are constants, so the gradient is the paper's.
        invstd = grouped.pop("invstd")
        if groups == 1:
            return _WholeBatchRenorm.apply(x, weight, bias, r, d, mean_b, var_biased, invstd, self.eps)
        return grouped_batch_norm(x, xmu, invstd, weight, bias, r, d, **grouped)

    def _factors(self, mean_b: Tensor, var_biased: Tensor, count: int,
                 weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, dict]:
        """``(r, d, grouped)`` for the batch statistics, the mean and the biased variance (each
        (C,) or (G, 1, 1, C), from ``count`` values per channel and group); updates the running
        statistics. ``grouped`` holds ``invstd = 1 / sigma_B`` and, where the statistics are per
        group, the other keywords of :func:`mabn.groups.grouped_batch_norm` (``invstd3``, or
        ``weighted`` given ``weight``).

        Seven dispatched ops before the update: one ``_foreach_addcmul`` (``sigma_B ** 2``, the
        unbiased variance, the running variance + eps, ``mu_B - running_mean`` and the schedule's
        affine map of the counter), one clamp of the limits and their ``unbind``, one
        ``_foreach_pow`` (every square root, ``1 / rmax_t``, ``1 / sigma_B`` and, per group,
        ``sigma_B ** 3`` or its inverse), one ``_foreach_div`` (``r`` and ``d`` unclipped and, per
        group, ``weight / sigma_B`` and ``weight / sigma_B ** 3``) and a clamp each for ``r`` and
        ``d``."""
        dtype, device = mean_b.dtype, mean_b.device
        per_group, weighted = mean_b.dim() > 1, mean_b.dim() > 1 and weight is not None
        eps, one = scalar(self.eps, dtype, device), scalar(1.0, dtype, device)
        running_mean = self.running_mean.to(dtype)
        running_var = self.running_var.to(dtype)
        slope, offset, low, high = self._limit_constants(dtype, device)
        var_b, var_unbiased, running_var_eps, mean_shift, ramp = torch._foreach_addcmul(
            [eps, negative_zero(dtype, device), running_var, mean_b, offset],
            [var_biased, var_biased, one, running_mean, self.num_batches_tracked],
            [one, scalar(count / (count - 1), dtype, device), eps, scalar(-1.0, dtype, device), slope])
        rmax, dmax, dmin = torch.clamp(ramp, low, high).unbind()
        bases = [var_b, running_var_eps, running_var, var_unbiased, rmax, var_b]
        exponents = [0.5, 0.5, 0.5, 0.5, -1.0, -0.5]
        if per_group:
            bases, exponents = bases + [var_b], exponents + [1.5 if weighted else -1.5]
        sigma_b, sigma, running_std, std_b, rmin, *invstd = torch._foreach_pow(bases, exponents)
        numerators, denominators = [sigma_b, mean_shift], [sigma, sigma]
        if weighted:  # weight / sigma_B and weight / sigma_B ** 3
            numerators, denominators = numerators + [weight, weight], denominators + [sigma_b, invstd[1]]
        r, d, *weight_invstd = torch._foreach_div(numerators, denominators)
        r, d = saved_for_backward(torch.clamp(r, rmin, rmax), torch.clamp(d, dmin, dmax))
        self._update_running_stats(running_mean, running_std, mean_b, std_b)
        if not per_group:
            return r, d, dict(invstd=invstd[0])
        if weighted:
            return r, d, dict(invstd=invstd[0], weighted=tuple(weight_invstd))
        return r, d, dict(invstd=invstd[0], invstd3=invstd[1])

    def _update_running_stats(self, running_mean: Tensor, running_std: Tensor, mean_b: Tensor,
                              std_b: Tensor) -> None:
        """EMA of the mean and of the (eps-free) standard deviation; advances the counter.

        ``mean_b`` and ``std_b`` (the unbiased one) are the batch's, (C,), or per group, (G, 1, 1,
        C): the EMAs then take their average over groups. A non-finite result skips the whole
        update (see the module docstring).
        """
        if mean_b.dim() > 1:
            mean_b, std_b = mean_b.mean(dim=(0, 1, 2)), std_b.mean(dim=(0, 1, 2))
        mean, std = torch._foreach_lerp([running_mean, running_std], [mean_b, std_b], self.momentum)
        self._commit_running_stats(mean, std.square_())


class _WholeBatchRenorm(torch.autograd.Function):
    """Batch norm of the whole batch on its given statistics (``mean``, biased ``var`` and ``invstd
    = 1 / sqrt(var + eps)``, (C,)) with scale ``weight * r`` and shift ``weight * d + bias`` (one
    ``_foreach_addcmul``) for constant (C,) ``r`` and ``d``: one ``native_batch_norm`` call in
    inference mode forward (a single pass over the input: the statistics are not computed again)
    and one ``native_batch_norm_backward`` call in training mode backward, with the statistics as
    its saved ones (the gradient through the batch statistics; the scale is given as weight, as
    CUDA requires wherever a weight gradient is asked for), whose scale and shift gradients give
    the weight's as ``grad_scale * r + grad_shift * d``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], r: Tensor, d: Tensor,
                mean: Tensor, var: Tensor, invstd: Tensor, eps: float) -> Tensor:
        if weight is None:
            scale, shift = r, d
        else:
            zero = negative_zero(r.dtype, r.device, r.shape)
            scale, shift = torch._foreach_addcmul([zero, zero if bias is None else bias], [weight, weight], [r, d])
        out = torch.ops.aten.native_batch_norm(x, scale, shift, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(x, scale, mean, invstd, r, d)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, scale, save_mean, save_invstd, r, d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
            dy, x, scale, None, None, save_mean, save_invstd, True, ctx.eps,
            [needs[0], needs[1], needs[1] or needs[2]])
        grad_weight = torch.addcmul(grad_scale.mul_(r), grad_shift, d) if needs[1] else None
        return dx, grad_weight, grad_shift if needs[2] else None, None, None, None, None, None, None


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W) input."""

    _expected_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W) input."""

    _expected_dims = (5,)
