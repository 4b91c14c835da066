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
on that group). With ``G > 1`` the layer makes no copy of the input: it works on the
channels-last (G, B, S, C) view (:func:`mabn.groups.grouped_view`), the statistics and the
deviations from the group means come from :func:`mabn.groups.grouped_moments` (``var_mean`` and
one subtraction on a GPU; on the CPU, where var_mean is slow, two passes: a mean, the
deviations, and the sum of their squares), and the backward is batch norm's, written out in
:func:`mabn.groups.grouped_batch_norm` (one product, two reductions and two fused element-wise
passes, every per-group coefficient broadcast); it is first-order only (no double backward).
Batch Renormalization shares these functions. Both running statistics advance in one
``_foreach_lerp``, which also gives the biased variance + eps of every group (``var + (n * eps -
var) / n`` for the unbiased ``var`` of ``n`` values is a lerp); one ``_foreach_pow`` gives its
inverse square root and cube. A training forward + backward dispatches 30 ops at four groups on
a GPU and 32 on the CPU (the two-pass statistics' mean and sum of squares; the autograd
engine's three gradient accumulations included), 15 with one group.

Running statistics are updated ONCE per forward with torch's BatchNorm rule applied to the
average over groups of the group means and of the group unbiased variances::

    running_mean = (1 - f) * running_mean + f * mean_g(mean_g)
    running_var  = (1 - f) * running_var  + f * mean_g(var_g * n / (n - 1))

with ``n = B * prod(spatial)``, ``f = momentum`` (or ``1 / (num_batches_tracked + 1)`` when
``momentum`` is None: cumulative average, as in torch). ``num_batches_tracked`` counts updates.

Non-finite statistics (a NaN or inf in the input, or a variance that overflows) never enter the
running statistics: the whole update of that forward is skipped and counted in the 0-dim long
buffer ``skipped_updates``, without a host sync (:mod:`mabn.running_stats`). An empty batch
returns an empty output and leaves every buffer unchanged.

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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mabn.groups import (cached_constant, check_group_size, count_groups, grouped_batch_norm, grouped_moments,
                         grouped_view, scalar)
from mabn.precision import statistics_dtype
from mabn.running_stats import FiniteRunningStats

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


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
        with torch.no_grad():
            # (G, 1, 1, C) statistics and the deviations x_p - mean of the (G, B, S, C) view
            mean, var_unbiased, xmu = grouped_moments(grouped_view(x, groups), correction=1)
            # the biased variance + eps, var_unbiased * (n - 1) / n + eps, as the lerp
            # var_unbiased + (n * eps - var_unbiased) / n (within a few ulps): it joins the
            # running statistics' lerp
            n_eps = cached_constant(("ghost_n_eps", tuple(mean.shape), per_group, self.eps, dtype), x.device,
                                    lambda d: torch.full(mean.shape, per_group * self.eps, dtype=dtype, device=d))
            if update:
                # torch's update is linear in the batch statistics: average them over groups
                running = [self.running_mean.to(dtype), self.running_var.to(dtype), var_unbiased]
                batch = [mean.mean(dim=(0, 1, 2)), var_unbiased.mean(dim=(0, 1, 2)), n_eps]
                if self.momentum is None:  # cumulative average: weight tensors
                    factor = 1.0 / (self.num_batches_tracked + 1).to(dtype)
                    weights = [factor, factor, scalar(1.0 / per_group, dtype, x.device)]
                else:
                    weights = [self.momentum, self.momentum, 1.0 / per_group]
                new_mean, new_var, var_eps = torch._foreach_lerp(running, batch, weights)
            else:
                var_eps = torch.lerp(var_unbiased, n_eps, 1.0 / per_group)
            invstd, invstd3 = torch._foreach_pow([var_eps, var_eps], [-0.5, -1.5])
        out = grouped_batch_norm(x, xmu, invstd, weight, bias, invstd3=invstd3)
        if update:
            self._commit_running_stats(new_mean, new_var)
        return out.to(input.dtype)

    def _whole_batch_forward(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             update: bool) -> Tensor:
        """One group: torch's batch norm call, exactly as ``nn.BatchNorm`` makes it."""
        if not update:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        factor = self._update_factor()
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
