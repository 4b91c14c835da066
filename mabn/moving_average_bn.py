"""Moving Average Batch Normalization (MABN).

Yan, Wan, Zhang, Zhang, Wei, Sun. "Towards Stabilizing Batch Statistics in Backward Propagation
of Batch Normalization", ICLR 2020.

With tiny normalization batches the batch statistics of BN are noisy in the forward pass (the
second moment ``chi``) AND in the backward pass (``psi``, the mean of ``dL/dx_hat * x_hat``).
MABN replaces both by simple moving averages over the last ``W = real_B // B`` normalization
groups, normalizes only the second moment (the mean is removed by weight centralization in the
preceding :class:`~mabn.cen_conv.CenConv2d`), renormalizes towards an EMA of the second moment
(``r``) after a warm-up, and uses that EMA at inference, where the layer is a per-channel affine
map that folds into the conv exactly like BN.

The layer subclasses ``torch.nn.modules.batchnorm._BatchNorm`` with ``running_mean`` fixed at
zero, so helpers that freeze or fuse BN layers (``isinstance(m, _BatchNorm)``) treat the
inference-time MABN correctly. Two conventions differ from torch's BatchNorm:

* ``momentum`` weights the OLD value: ``running_var <- momentum * running_var + (1 - momentum)
  * chi`` (0.98 by default, as published). ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
  copies ``momentum`` verbatim; use :func:`mabn.convert_norm` to change norms instead.
* ``num_batches_tracked`` is the iteration counter ``t`` of the schedule below.

Definitions per channel (see ``docs/algorithm.md``). A training forward is split into groups:
one group (``split_batch=False``: the B images of a detector GPU) or ``N / B`` consecutive groups
of ``B`` samples (``split_batch=True``: normalization batch B inside a larger SGD batch). Groups
form one stream across forwards; for group ``k`` of forward ``t`` a statistic uses the group's
own value while ``t < warmup_iters`` or ``k <= W``, else the mean of the last ``W`` values of the
stream. ``r = sqrt(chi + eps) / sqrt(running_var + eps)`` is 1 up to ``r_warmup_iters`` and then
clamped to ``[1 / r_max, r_max]``. Forward ``y = weight * r * x / sqrt(chi + eps) + bias``;
backward ``dx = (g - z * psi) / sqrt(chi + eps)`` with ``g = dy * weight * r``, ``z = x /
sqrt(chi + eps)``: the averaged ``psi`` replaces the batch one, so this is deliberately NOT the
autograd gradient of the forward.

The schedule is tensor logic on buffers (no ``.item()``): a training step never synchronizes
with the device, and ``torch.compile`` traces it once.

Activation checkpointing: recomputing a training forward advances the counters and the ``chi``
window a second time (the backward's ``psi`` window advances once per backward). Do not wrap
MABN layers in ``torch.utils.checkpoint``, or put them in eval mode for the recomputation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mabn.compile_barrier import saved_for_backward
from mabn.groups import count_groups
from mabn.precision import statistics_dtype

__all__ = ["MABN1d", "MABN2d", "MABN3d"]



def _windowed(window: Tensor, values: Tensor, use_own: Tensor) -> Tuple[Tensor, Tensor]:
    """Apply the statistic rule to a stream of per-group values.

    ``window`` (W, C) holds the last W values of the stream, oldest first; ``values`` (G, C) are
    the next G values. Returns the value to use for each group (its own where ``use_own``, else
    the mean of the W values ending at it) and the window after appending ``values``.
    """
    size = window.shape[0]
    stream = torch.cat([window, values.to(window.dtype)], dim=0)
    moving = stream.unfold(0, size, 1)[1:].mean(dim=-1)
    return torch.where(use_own, values, moving), stream[-size:]


def _per_sample(per_group: Tensor, batch: int) -> Tensor:
    """(G, C) group coefficients as a (1 or N, C, 1) tensor that broadcasts over (N, C, S)."""
    groups, channels = per_group.shape
    if groups == 1:
        return per_group.view(1, channels, 1)
    return per_group.unsqueeze(1).expand(groups, batch // groups, channels).reshape(batch, channels, 1)


def _scale_shift(x: Tensor, scale: Tensor, shift: Optional[Tensor], out: Tensor) -> Tensor:
    """``out = x * scale + shift`` for (N, C, S) ``x`` and coefficients broadcasting over S.

    ``out`` may be a view of a tensor of another shape: writing through it lets a custom
    Function return a fresh (non-view) tensor, so in-place ops downstream (``ReLU(inplace=True)``)
    need no CopySlices. A broadcast multiply then an in-place add is faster on CPU than
    ``addcmul``.
    """
    torch.mul(x, scale, out=out)
    if shift is not None:
        out.add_(shift)
    return out


def _plane_sums(grad: Tensor, planes: Tensor) -> Tuple[Tensor, Tensor]:
    """Per plane ``sum(grad * planes)`` and ``sum(grad)`` in one pass (BN's backward reductions)."""
    ones = planes.new_ones(planes.shape[1])
    _, grad_x_sums, grad_sums = torch.ops.aten.native_batch_norm_backward(
        grad, planes, None, torch.zeros_like(ones), ones, None, None, False, 0.0, [False, True, True])
    return grad_x_sums, grad_sums


@torch.no_grad()
def _advance_forward_statistics(x: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
                                groups_seen: Tensor, chi_window: Tensor, groups: int, warmup_iters: int,
                                r_warmup_iters: int, eps: float, momentum: float,
                                r_max: float) -> Tuple[Tensor, Tensor, Tensor]:
    """One training forward's statistics: returns ``u = r / sqrt(chi + eps)``, ``1 / (chi + eps)``
    (both (G, C)) and the own-statistic mask (G, 1), and advances the buffers in place."""
    step = num_batches_tracked + 1
    window = chi_window.shape[0]
    group_index = groups_seen + torch.arange(1, groups + 1, device=x.device)
    use_own = ((step < warmup_iters) | (group_index <= window)).unsqueeze(1)

    stat_dtype = statistics_dtype(x.dtype)
    sample_x2 = torch.linalg.vector_norm(x, dim=2, dtype=stat_dtype).square() / x.shape[2]
    chi = sample_x2.view(groups, -1, x.shape[1]).mean(dim=1).to(chi_window.dtype)
    chi_used, new_window = _windowed(chi_window, chi, use_own)

    std = (chi_used + eps).sqrt()
    r = (std / (running_var + eps).sqrt()).clamp(1.0 / r_max, r_max)
    r = torch.where(step > r_warmup_iters, r, 1.0)

    running_var.mul_(momentum).add_(chi_used.mean(dim=0), alpha=1.0 - momentum)
    chi_window.copy_(new_window)
    num_batches_tracked.add_(1)
    groups_seen.add_(groups)
    return tuple(saved_for_backward(r / std, 1.0 / (chi_used + eps), use_own))


class _MABNFunction(torch.autograd.Function):
    """``y = weight * u * x + bias`` with MABN's moving-average backward.

    ``x`` is (N, C, *); the work is done on its (N, C, S) view with coefficients per group
    broadcast to its samples, so each step is one vectorized kernel. ``u = r / sqrt(chi + eps)``
    and ``inv_var = 1 / (chi + eps)`` are per group (G, C) and constants. The backward averages
    ``psi`` over the window in ``psi_window`` (updated in place) and returns the input, weight
    and bias gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, u: Tensor, inv_var: Tensor,
                use_own: Tensor, psi_window: Tensor) -> Tensor:
        compute_dtype = statistics_dtype(x.dtype)
        x3 = x.to(compute_dtype).reshape(x.shape[0], x.shape[1], -1)
        y = torch.empty(x.shape, dtype=compute_dtype, device=x.device)
        _scale_shift(x3, _per_sample((weight * u).to(compute_dtype), x.shape[0]),
                     bias.to(compute_dtype).view(1, -1, 1), y.view(x3.shape))
        ctx.save_for_backward(x, weight, u, inv_var, use_own, psi_window)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, u, inv_var, use_own, psi_window = ctx.saved_tensors
        compute_dtype = statistics_dtype(x.dtype)
        batch, channels, groups = x.shape[0], x.shape[1], u.shape[0]
        x3 = x.to(compute_dtype).reshape(batch, channels, -1)
        grad = grad_out.to(compute_dtype).reshape(x3.shape)

        grad_x_sums, grad_sums = _plane_sums(grad.view(1, -1, x3.shape[2]), x3.view(1, -1, x3.shape[2]))
        dy_x = grad_x_sums.view(groups, -1, channels).sum(dim=1).to(u.dtype)
        grad_weight = (dy_x * u).sum(dim=0)
        grad_bias = grad_sums.view(batch, channels).sum(dim=0)
        scale = weight * u
        psi = scale * dy_x / ((batch // groups) * x3.shape[2])
        psi_used, new_window = _windowed(psi_window, psi, use_own)
        psi_window.copy_(new_window)

        grad_x = torch.empty(x.shape, dtype=compute_dtype, device=x.device)
        grad_x3 = _scale_shift(grad, _per_sample(scale.to(compute_dtype), batch), None, grad_x.view(x3.shape))
        grad_x3.addcmul_(x3, _per_sample((-psi_used * inv_var).to(compute_dtype), batch))
        return (grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype),
                None, None, None, None)


class _MovingAverageBatchNorm(_BatchNorm):
    """Shared implementation of :class:`MABN1d`, :class:`MABN2d` and :class:`MABN3d`.

    Args:
        num_features: channels ``C``.
        B: normalization batch (samples per group).
        real_B: moving-average batch; the window holds ``W = real_B // B`` groups.
        eps: added to the second moment.
        momentum: EMA weight of the OLD ``running_var`` (0.98 as published).
        warmup_iters: training forwards during which each group uses its own statistics.
        split_batch: split each input batch into ``N / B`` groups (ImageNet protocol) instead
            of normalizing the whole batch as one group (detection protocol).
        r_max: bound of the renormalization factor ``r`` once it is enabled.
        r_warmup_iters: ``r = 1`` for ``t <= r_warmup_iters``; default ``max(1000, warmup_iters)``.
    """

    _expected_dims: Tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        B: int = 2,
        real_B: int = 32,
        eps: float = 1e-5,
        momentum: float = 0.98,
        warmup_iters: int = 100,
        *,
        split_batch: bool = False,
        r_max: float = 5.0,
        r_warmup_iters: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        if B < 1 or real_B < 1 or real_B % B != 0:
            raise ValueError(
                f"MABN needs real_B to be a positive multiple of B (the window is real_B // B "
                f"groups); got B={B}, real_B={real_B}. Choose e.g. real_B={B * max(1, real_B // max(B, 1))}.")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MABN momentum weights the old running_var and must lie in [0, 1]; got {momentum}")
        if r_max < 1.0:
            raise ValueError(f"r_max must be >= 1 (r is clamped to [1/r_max, r_max]); got {r_max}")
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True,
                         device=device, dtype=dtype)
        self.B = B
        self.real_B = real_B
        self.window = real_B // B
        self.warmup_iters = warmup_iters
        self.split_batch = split_batch
        self.r_max = float(r_max)
        self.r_warmup_iters = max(1000, warmup_iters) if r_warmup_iters is None else r_warmup_iters
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("groups_seen", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.zeros(self.window, num_features, **factory))
        self.register_buffer("buffer_gz", torch.zeros(self.window, num_features, **factory))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "groups_seen"):
            self.groups_seen.zero_()
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, B={self.B}, real_B={self.real_B}, eps={self.eps}, "
                f"momentum={self.momentum}, warmup_iters={self.warmup_iters}, "
                f"split_batch={self.split_batch}, r_max={self.r_max}, "
                f"r_warmup_iters={self.r_warmup_iters}")

    def _check_input_dim(self, input: Tensor) -> None:
        name = type(self).__name__
        if input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{name} expects {dims} input (N, C, ...), got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{name}({self.num_features}) got an input with {input.shape[1]} channels "
                             f"(shape {tuple(input.shape)}); build the layer with num_features={input.shape[1]}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        x = input.reshape(input.shape[0], input.shape[1], -1)
        groups = count_groups(type(self).__name__, self.B if self.split_batch else None, x.shape[0])
        u, inv_var, use_own = _advance_forward_statistics(
            x, self.running_var, self.num_batches_tracked, self.groups_seen, self.buffer_x2,
            groups, self.warmup_iters, self.r_warmup_iters, self.eps, self.momentum, self.r_max)
        return _MABNFunction.apply(input, self.weight, self.bias, u, inv_var, use_own, self.buffer_gz)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._upgrade_published_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _upgrade_published_state(self, state_dict: dict, prefix: str) -> None:
        """Rewrite the published MABN checkpoints into this layer's buffers, in place.

        Detection format: ``running_var (1,C,1,1)``, ``iters`` (long), ring buffers ``buffer_x2``
        and ``buffer_gz`` (W, C) whose slot ``t % W`` holds forward ``t``. ImageNet format:
        ``running_var (C,)``, ``sta_matrix``, ``pre_x2`` and ``pre_gz`` (W, C, oldest first) and
        a float ``iters``. Missing counters are derived from ``iters``; ``running_mean`` is zero.
        """
        iters_key = prefix + "iters"
        if iters_key not in state_dict:
            return
        iters = int(state_dict.pop(iters_key).reshape(-1)[0].item())
        running_var_key = prefix + "running_var"
        if running_var_key in state_dict:
            state_dict[running_var_key] = state_dict[running_var_key].reshape(-1)
        if prefix + "sta_matrix" in state_dict:
            state_dict.pop(prefix + "sta_matrix")
            state_dict[prefix + "buffer_x2"] = state_dict.pop(prefix + "pre_x2")
            state_dict[prefix + "buffer_gz"] = state_dict.pop(prefix + "pre_gz")
            groups_seen = iters * self.window
        else:
            for key in ("buffer_x2", "buffer_gz"):
                ring = state_dict[prefix + key]
                state_dict[prefix + key] = torch.roll(ring, shifts=-((iters + 1) % ring.shape[0]), dims=0)
            groups_seen = iters
        for key in ("buffer_x2", "buffer_gz"):
            if state_dict[prefix + key].shape[0] != self.window:
                raise ValueError(
                    f"checkpoint {prefix}{key} holds a window of {state_dict[prefix + key].shape[0]} groups but "
                    f"this layer has real_B // B = {self.window}; build the layer with the checkpoint's B and real_B")
        state_dict[prefix + "num_batches_tracked"] = torch.tensor(iters, dtype=torch.long)
        state_dict[prefix + "groups_seen"] = torch.tensor(groups_seen, dtype=torch.long)
        state_dict.setdefault(prefix + "running_mean", torch.zeros_like(self.running_mean))


class MABN1d(_MovingAverageBatchNorm):
    """MABN over (N, C) or (N, C, L) inputs (reduction over every dim but C)."""

    _expected_dims = (2, 3)


class MABN2d(_MovingAverageBatchNorm):
    """MABN over (N, C, H, W) inputs; positional arguments follow the published layer."""

    _expected_dims = (4,)


class MABN3d(_MovingAverageBatchNorm):
    """MABN over (N, C, D, H, W) inputs."""

    _expected_dims = (5,)
