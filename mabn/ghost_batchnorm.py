"""Ghost batch normalization: BatchNorm over groups of ``B`` consecutive samples.

Hoffer, Hubara, Soudry, "Train longer, generalize better", NeurIPS 2017 (arXiv:1705.08741).
Used here to simulate a small normalization batch ``B`` inside a larger per-GPU SGD batch (the
ImageNet protocol of the MABN paper: e.g. 32 images per GPU normalized in groups of 2), the
same split as :class:`mabn.MABN2d` with ``split_batch=True``.

Training forward on an (N, C, ...) batch with ``N % B == 0``: the batch is split IN ORDER into
``G = N / B`` groups of ``B`` consecutive samples, and each group is normalized with its own
per-channel mean and biased variance::

    y[g] = weight * (x[g] - mean_g) / sqrt(var_g + eps) + bias

The gradient is the gradient of this per-group batch norm (each group's statistics depend only
on that group). With ``G > 1`` the layer makes no copy of the input: the statistics come from
vectorized per-(sample, channel) row reductions combined per group (:func:`group_statistics`),
the output from one fused multiply-add, and the backward is batch norm's, written out in
:func:`group_batch_norm` (torch's batch-norm reduction kernel plus one fused multiply-add); it
is first-order only (no double backward). Batch Renormalization shares these two functions.

Running statistics are updated ONCE per forward with torch's BatchNorm rule applied to the
average over groups of the group means and of the group unbiased variances::

    running_mean = (1 - f) * running_mean + f * mean_g(mean_g)
    running_var  = (1 - f) * running_var  + f * mean_g(var_g * n / (n - 1))

with ``n = B * prod(spatial)``, ``f = momentum`` (or ``1 / (num_batches_tracked + 1)`` when
``momentum`` is None: cumulative average, as in torch). ``num_batches_tracked`` counts updates.

Non-finite statistics (a NaN or inf in the input, or a variance that overflows) never enter the
running statistics: when any channel's new ``running_mean`` or ``running_var`` would be
non-finite, the WHOLE update of that forward is skipped (buffers and ``num_batches_tracked``
unchanged, so the statistics stay one consistent snapshot) and the 0-dim long buffer
``skipped_updates`` is incremented; tensor logic only, no host sync. A state dict without
``skipped_updates`` (torch's BatchNorm, older checkpoints) loads strictly with the counter at 0.
An empty batch returns an empty output and leaves every buffer unchanged.

With ``G == 1`` (``B == N``) output, gradients and running statistics equal ``nn.BatchNorm``
exactly on finite input (the same kernel call; with ``momentum=None`` the factor is read on the
host, as torch's BatchNorm does). Evaluation (with tracked running statistics) is plain batch
norm with the running statistics. The layers subclass ``nn.BatchNorm{1,2,3}d``: ``isinstance``
checks, conv-BN folding and freezing treat them as BatchNorm. Converting to SyncBatchNorm with
:func:`mabn.convert_sync_batchnorm` leaves them alone (BN subclasses with other semantics are not
converted); torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns them into whole-batch
SyncBN.

Statistics are computed in float32 for float16/bfloat16 inputs; the output has the input's
dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mabn.groups import check_group_size, count_groups
from mabn.precision import statistics_dtype

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


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

        # torch's batch-norm backward reduction per (sample, channel) row: sum(dy * x_hat), sum(dy)
        rows = (1, groups * batch * channels, -1)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.reshape(rows), x.reshape(rows), None, None, None, per_row(mean), per_row(invstd),
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


class FiniteRunningStats:
    """Running-statistics commit that skips non-finite updates; mixed in before a ``_BatchNorm``.

    Adds the 0-dim long buffer ``skipped_updates`` (when running statistics are tracked); state
    dicts without it load strictly with the counter at 0.
    """

    def _register_skip_counter(self, device: Optional[torch.device]) -> None:
        counter = torch.zeros((), dtype=torch.long, device=device) if self.track_running_stats else None
        self.register_buffer("skipped_updates", counter)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "skipped_updates", None) is not None:  # None while _BatchNorm.__init__ runs
            self.skipped_updates.zero_()

    @torch.no_grad()
    def _commit_running_stats(self, mean: Tensor, var: Tensor) -> None:
        """Copy ``mean``/``var`` into the running buffers and count the step, unless any value is
        non-finite: then nothing changes but ``skipped_updates``."""
        finite = (torch.cat([mean, var]) * 0 == 0).all()  # x * 0 is NaN for inf and NaN
        self.running_mean.copy_(torch.where(finite, mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, var, self.running_var))
        self.num_batches_tracked.add_(finite)
        self.skipped_updates.add_(~finite)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "skipped_updates"
        if getattr(self, "skipped_updates", None) is not None and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _GhostBatchNormMixin(FiniteRunningStats):
    """Shared forward of GhostBatchNorm{1,2,3}d; mixed in before ``nn.BatchNorm{1,2,3}d``."""

    B: int

    def __init__(
        self,
        num_features: int,
        B: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        B = check_group_size(B)
        if bias:  # keep working with torch versions whose BatchNorm has no ``bias`` keyword
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                             bias=False)
        self.B = B
        self._register_skip_counter(device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, B={self.B}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return super().forward(input)  # plain BN with the running statistics
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                             f"channels in dim 1, got input of shape {tuple(input.shape)}")
        groups = count_groups(type(self).__name__, self.B, input.shape[0])
        dtype = statistics_dtype(input.dtype)
        x = input.to(dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if x.numel() == 0:  # nothing to normalize; statistics and counters stay as they are
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps).to(input.dtype)
        per_group = x.numel() // (x.shape[1] * groups)  # values per channel and group
        if per_group < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got groups of "
                             f"B={self.B} samples of shape {tuple(input.shape[1:])}")
        update = self.training and self.track_running_stats
        if groups == 1:
            return self._whole_batch_forward(x, weight, bias, update).to(input.dtype)
        mean, var = group_statistics(x, groups)
        scale = torch.ones_like(mean) if weight is None else weight.expand_as(mean)
        shift = torch.zeros_like(mean) if bias is None else bias.expand_as(mean)
        out = group_batch_norm(x, mean, torch.rsqrt(var + self.eps), scale, shift)
        if update:
            with torch.no_grad():
                # torch's update is linear in the batch statistics: average them over groups
                factor = (1.0 / (self.num_batches_tracked + 1).to(dtype) if self.momentum is None
                          else self.momentum)
                batch_mean = mean.mean(dim=0)
                batch_var = var.mean(dim=0) * (per_group / (per_group - 1))
                self._commit_running_stats(torch.lerp(self.running_mean.to(dtype), batch_mean, factor),
                                           torch.lerp(self.running_var.to(dtype), batch_var, factor))
        return out.to(input.dtype)

    def _whole_batch_forward(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             update: bool) -> Tensor:
        """One group: torch's batch norm call, exactly as ``nn.BatchNorm`` makes it."""
        if not update:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self.momentum is None:  # cumulative average with torch's host-side factor
            factor = 1.0 / float(self.num_batches_tracked + 1)
        else:
            factor = self.momentum
        # copies that the kernel updates; committed only when finite
        running_mean = self.running_mean.to(x.dtype, copy=True)
        running_var = self.running_var.to(x.dtype, copy=True)
        out = F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, self.eps)
        self._commit_running_stats(running_mean, running_var)
        return out


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input: groups of ``B`` consecutive samples."""


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input: groups of ``B`` consecutive samples."""


class GhostBatchNorm3d(_GhostBatchNormMixin, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input: groups of ``B`` consecutive samples."""
