"""Synchronized batch normalization that also works on CPU (gloo).

Why this exists
---------------
``torch.nn.SyncBatchNorm`` only synchronizes inputs on CUDA / XPU / HPU / the PrivateUse1
backend: on a CPU tensor in a distributed training step it raises
``ValueError("SyncBatchNorm expected input tensor to be on GPU ...")``, even when the world
size is 1. Tests, CI and CPU-only multi-process runs (gloo backend) therefore cannot use it.
:class:`SyncBatchNorm` here is a drop-in subclass of ``torch.nn.SyncBatchNorm`` (same
constructor, parameters and buffers, plus the ``skipped_updates`` counter) whose forward is
torch's, except that

* when synchronization is needed (training mode with ``torch.distributed`` initialized and more
  than one process in ``self.process_group`` or the default group), inputs on a device torch's
  implementation supports go to torch's fused synchronized kernels, as before, and inputs on
  any other device (CPU, ...) to a small all-reduce implementation;
* it behaves exactly like ``nn.BatchNorm`` (``F.batch_norm``) when it is not: distributed not
  available / not initialized, world size 1, or eval mode;
* non-finite statistics never reach the running buffers (below).

What it computes
----------------
For channel ``c`` the statistics are those of the *global* batch, i.e. the concatenation of the
local batches of all ranks along dimension 0 (reduction over N and all spatial dimensions)::

    n     = sum_r count_r                                  (all-reduce #1, with the sums)
    mean  = sum_r sum(x_r) / n
    var   = sum_r sum((x_r - mean) ** 2) / n               (all-reduce #2, biased)
    y     = (x - mean) / sqrt(var + eps) * weight + bias

Two all-reduces are used on purpose (the "two-pass" form): the centred sum of squares is
numerically stable, whereas the one-pass ``E[x^2] - E[x]^2`` loses all precision when
``|mean| >> std`` (catastrophic cancellation). The reduced vectors are tiny (``C + 1`` and
``C`` values) and travel in float64, so per-channel counts stay exact and the cross-rank
additions add no rounding; the large per-element work (sums over the local batch) is done in the
statistics dtype: float32 for float16 / bfloat16 inputs (and float32 inputs), float64 for float64
inputs. The output is cast back to the input dtype.

Both all-reduces are differentiable (their backward is an all-reduce-sum of the incoming
gradients), so autograd yields exactly the gradients of ``BatchNorm`` applied to the global
batch with the global loss ``sum_r loss_r``: input gradients on each rank equal the matching
slice of the reference input gradient; the weight / bias gradients of each rank are that rank's
share, and summing them over ranks gives the reference gradient (DDP's gradient averaging divides
that by the world size, as it does for every other parameter).

Running statistics are updated exactly like ``nn.BatchNorm`` would update them on the global
batch: ``running_mean <- (1 - f) * running_mean + f * mean`` and
``running_var <- (1 - f) * running_var + f * var * n / (n - 1)`` (unbiased, global ``n``), with
``f = momentum`` or, for ``momentum=None``, ``f = 1 / (num_batches_tracked + 1)`` (cumulative
average).

Non-finite statistics (a NaN or inf in the input of any rank, or a variance that overflows)
never enter the running statistics, on every path (torch's kernels on CUDA included): the
kernels update copies, and when any new value is non-finite the whole update is skipped
(``num_batches_tracked`` too) and counted in the 0-dim long buffer ``skipped_updates``, without
a host sync (:mod:`mabn.running_stats`). The statistics are global, so every rank skips the same
steps. The output of such a step is whatever the batch gives (NaN), as in torch.

Edge cases: a rank whose local batch is empty (N = 0) still takes part in both all-reduces
(contributing zeros, no division by its local count) and in their backward, so nothing hangs.
If the *global* batch is empty, the output is empty and every buffer is left unchanged
(``num_batches_tracked`` included, unlike ``nn.BatchNorm``, as in ghost BN and Batch
Renormalization). Only torch's fused kernels (CUDA, ...) with more than one process cannot see
that the global batch is empty without one more collective; there the update is torch's
kernel's. If the global batch has a single value per channel, every rank raises the same
``ValueError`` as ``nn.BatchNorm`` (the decision is made on the all-reduced count, so all ranks
agree and none is left waiting).

Every rank must call ``backward`` through the layer's output when the others do (as with DDP):
the backward all-reduces are collectives too.

Conversion: :func:`mabn.convert_sync_batchnorm` and, for the way back,
:func:`mabn.revert_sync_batchnorm` (pytorch/pytorch#41081), both in :mod:`mabn.convert`; this
module depends on no other part of the package but :mod:`mabn.precision` and
:mod:`mabn.running_stats`.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNormFunction

from mabn.precision import statistics_dtype
from mabn.running_stats import FiniteRunningStats

__all__ = ["SyncBatchNorm"]


def _torch_sync_devices() -> Tuple[str, ...]:
    """Device types for which ``torch.nn.SyncBatchNorm`` has a synchronized implementation."""
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum). Backward: all-reduce-sum of the output gradients.

    Same semantics as ``torch.distributed.nn.functional.all_reduce`` with ``op=SUM``, which
    emits a deprecation ``FutureWarning`` on every call in recent torch releases.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        return _AllReduceSum.apply(grad_output, ctx.group), None


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


def _sync_batch_norm_all_reduce(
    input: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    eps: float,
    momentum: float,
    group: Any,
) -> Tuple[torch.Tensor, int]:
    """Training-mode batch norm with statistics over the batches of all ranks of ``group``;
    returns the output and the global number of values per channel."""
    num_channels = input.size(1)
    reduce_dims = [0] + list(range(2, input.dim()))
    param_shape = [1, num_channels] + [1] * (input.dim() - 2)
    local_count = input.numel() // num_channels  # 0 for an empty local batch

    x = input.to(statistics_dtype(input.dtype))

    # All-reduce #1: per-channel sums and the (per-channel) count, packed, in float64.
    local_sum = x.sum(dim=reduce_dims).to(torch.float64)
    count = torch.full((1,), float(local_count), dtype=torch.float64, device=x.device)
    packed = _all_reduce_sum(torch.cat([local_sum, count]), group)
    global_sum, global_count = packed[:num_channels], packed[num_channels]
    n = int(round(global_count.item()))
    if n == 1:
        # Same on every rank (n is global), so no rank is left waiting in a collective.
        raise ValueError(
            "Expected more than 1 value per channel when training, got a global batch of "
            f"1 value per channel (local input size {tuple(input.shape)})"
        )
    mean = global_sum / max(n, 1)

    # All-reduce #2: centred sums of squares around the global mean (two-pass, stable).
    centred = x - mean.to(x.dtype).view(param_shape)
    local_sq = (centred * centred).sum(dim=reduce_dims).to(torch.float64)
    sq = _all_reduce_sum(local_sq, group)
    var = sq / max(n, 1)  # biased variance, used for normalization
    invstd = torch.rsqrt(var + eps).to(x.dtype)

    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    out = centred * scale.view(param_shape)
    if bias is not None:
        out = out + bias.to(x.dtype).view(param_shape)

    if n > 0 and (running_mean is not None or running_var is not None):
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1.0 - momentum).add_(
                    mean.detach().to(running_mean.dtype), alpha=momentum
                )
            if running_var is not None:
                unbiased = sq.detach() / (n - 1)
                running_var.mul_(1.0 - momentum).add_(
                    unbiased.to(running_var.dtype), alpha=momentum
                )
    return out.to(input.dtype), n


class SyncBatchNorm(FiniteRunningStats, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` with an all-reduce implementation for CPU tensors.

    Constructor, parameters, buffers and state dict are those of ``torch.nn.SyncBatchNorm``
    (``num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
    process_group=None, device=None, dtype=None``). Inputs are ``(N, C, *)`` with any number
    of trailing dimensions (2D to 5D and beyond). See the module docstring for what is computed.
    With ``track_running_stats`` it has one more buffer, the 0-dim long ``skipped_updates``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

        # Batch statistics in training mode, and in eval mode when there are no buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)

        # Buffers are passed only if they are used or updated. An update goes to copies, which
        # _commit_running_stats checks before anything enters the buffers (the kernels may also
        # save what they get for backward, so the buffers themselves must not be edited afterwards).
        updates = self.training and self.track_running_stats and self.running_mean is not None
        factor = self._update_factor() if updates else 0.0
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if updates:
            running_mean, running_var = running_mean.clone(), running_var.clone()

        # Like torch's: synchronize only in training mode, never in eval mode.
        group = None
        need_sync = (
            bn_training
            and self.training
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        )
        if need_sync:
            group = (
                self.process_group
                if self.process_group is not None
                else torch.distributed.group.WORLD
            )
            need_sync = torch.distributed.get_world_size(group) > 1

        global_count: Optional[int] = input.numel() // input.shape[1]  # values per channel
        if not need_sync:
            out = F.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                               factor, self.eps)
        elif input.device.type in _torch_sync_devices():
            global_count = None  # not known here without one more collective
            out = _TorchSyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                                    factor, group, torch.distributed.get_world_size(group))
        else:
            out, global_count = _sync_batch_norm_all_reduce(input, self.weight, self.bias, running_mean,
                                                            running_var, self.eps, factor, group)
        if updates and global_count != 0:  # an empty batch leaves every buffer unchanged
            self._commit_running_stats(running_mean, running_var)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Not here: use :func:`mabn.convert_sync_batchnorm` (torch's classmethod, inherited otherwise,
        would build ``torch.nn.SyncBatchNorm`` layers, which fail on CPU)."""
        raise TypeError("use mabn.convert_sync_batchnorm(module, process_group) to convert to mabn.SyncBatchNorm")
