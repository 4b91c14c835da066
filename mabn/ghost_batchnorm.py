"""Ghost batch normalization: BatchNorm over groups of ``B`` consecutive samples.

Hoffer, Hubara, Soudry, "Train longer, generalize better", NeurIPS 2017 (arXiv:1705.08741).
Used here to simulate a small normalization batch ``B`` inside a larger per-GPU SGD batch (the
ImageNet protocol of the MABN paper: e.g. 32 images per GPU normalized in groups of 2), the
same split as :class:`mabn.MABN2d` with ``split_batch=True``.

Training forward on an (N, C, ...) batch with ``N % B == 0``: the batch is split IN ORDER into
``G = N / B`` groups of ``B`` consecutive samples, and each group is normalized with its own
per-channel mean and biased variance::

    y[g] = weight * (x[g] - mean_g) / sqrt(var_g + eps) + bias

The gradient is the true autograd gradient of this per-group batch norm (each group's
statistics depend only on that group). The implementation is one vectorized reshape to
``(G, B, C, ...)`` (a view, so ``channels_last`` inputs are not copied), no loop over groups.

Running statistics are updated ONCE per forward with torch's BatchNorm rule applied to the
average over groups of the group means and of the group unbiased variances::

    running_mean = (1 - f) * running_mean + f * mean_g(mean_g)
    running_var  = (1 - f) * running_var  + f * mean_g(var_g * n / (n - 1))

with ``n = B * prod(spatial)``, ``f = momentum`` (or ``1 / num_batches_tracked`` when
``momentum`` is None: cumulative average, as in torch). ``num_batches_tracked`` counts forwards.

With ``G == 1`` (``B == N``) the layer dispatches to ``F.batch_norm`` and equals
``nn.BatchNorm{1,2,3}d`` exactly. Evaluation (with tracked running statistics) is plain batch
norm with the running statistics. The layers subclass ``nn.BatchNorm{1,2,3}d``: ``isinstance``
checks, state dicts (no extra keys: ``B`` is configuration), conv-BN folding and freezing treat
them as BatchNorm. Converting to SyncBatchNorm with :func:`mabn.convert_sync_batchnorm` leaves
them alone (BN subclasses with other semantics are not converted); torch's own
``nn.SyncBatchNorm.convert_sync_batchnorm`` turns them into whole-batch SyncBN.

Statistics are computed in float32 for float16/bfloat16 inputs; the output has the input's
dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mabn.precision import statistics_dtype

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]



def _check_group_size(B: object) -> int:
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"B (the normalization batch size) must be a positive int, got {B!r}")
    return B


def num_groups(module: nn.Module, batch: int) -> int:
    """``batch // module.B``; raises a ValueError when ``batch`` is not a multiple of ``B``."""
    if batch % module.B != 0:
        raise ValueError(f"{type(module).__name__} normalizes groups of B={module.B} consecutive "
                         f"samples, but the batch has {batch} samples; use a batch size divisible "
                         f"by {module.B}")
    return batch // module.B


class _GhostBatchNormMixin:
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
        B = _check_group_size(B)
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
        groups = num_groups(self, input.shape[0])
        if groups == 1:
            return super().forward(input)  # exactly nn.BatchNorm
        return self._ghost_forward(input, groups)

    def _ghost_forward(self, input: Tensor, groups: int) -> Tensor:
        per_group = input[0].numel() // input.shape[1] * self.B  # values per channel and group
        if per_group < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got groups of "
                             f"B={self.B} samples of shape {tuple(input.shape[1:])}")
        dtype = statistics_dtype(input.dtype)
        x = input.to(dtype).unflatten(0, (groups, self.B))  # (G, B, C, *spatial), a view
        dims = [1, *range(3, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)  # (G, 1, C, 1, ...)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        shape = (1, 1, -1) + (1,) * (x.dim() - 3)
        if self.weight is not None:
            y = y * self.weight.to(dtype).view(shape)
        if self.bias is not None:
            y = y + self.bias.to(dtype).view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.flatten(1), var.flatten(1) * (per_group / (per_group - 1)))
        return y.flatten(0, 1).to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, group_means: Tensor, group_vars_unbiased: Tensor) -> None:
        """torch's BN update with the average over groups; advances ``num_batches_tracked``."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as in torch
            factor = 1.0 / self.num_batches_tracked.to(group_means.dtype)
        else:
            factor = self.momentum
        mean = group_means.mean(dim=0)
        var = group_vars_unbiased.mean(dim=0)
        if self.running_mean is not None:
            self.running_mean.copy_(self.running_mean.to(mean.dtype) * (1 - factor) + mean * factor)
        if self.running_var is not None:
            self.running_var.copy_(self.running_var.to(var.dtype) * (1 - factor) + var * factor)


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input: groups of ``B`` consecutive samples."""


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input: groups of ``B`` consecutive samples."""


class GhostBatchNorm3d(_GhostBatchNormMixin, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input: groups of ``B`` consecutive samples."""
