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

The schedule never reads a buffer on the host (no ``.item()``): a training step never
synchronizes with the device. Its branches are taken in Python where the step counters are known
on the host (:mod:`mabn.host_counters`: always on the CPU, on other devices after construction, a
reset, a load or a move), so a decided branch dispatches nothing; elsewhere, and always under
``torch.compile`` (which traces it once), it is tensor logic on the buffers. With one group the
step runs BN's own inference kernels (forward, and one backward call for the input gradient and
the reductions, with per-channel variance ``(chi + eps) / r**2`` and mean 0); 27 dispatched ops
per forward + backward of a ``split_batch=False`` layer (3 of them views, which launch nothing on
a GPU), 31 for a ``split_batch`` layer with one group, 50 with four groups (15 views).

``fused_statistics=True`` runs that bookkeeping (everything between the second-moment reduction
and BN's kernels, in both passes) as one Triton kernel per pass on CUDA
(:mod:`mabn.fused_statistics`): per forward + backward 11 dispatched ops and 2 Triton kernels
instead of 27 ops for a ``split_batch=False`` layer, 27 ops (11 views) and 2 kernels instead of
50 for a ``split_batch`` layer of two groups. It is opt-in until it has been measured on a GPU.

Windows: a ``split_batch=False`` layer (one group per forward, the detection protocol) keeps
``buffer_x2`` and ``buffer_gz`` as rings whose row ``i % W`` holds the statistic of group ``i``
of the stream: a forward writes one row and averages the ring, no shifting. A ``split_batch``
layer shifts its windows, oldest row first, since the moving averages of its groups need the
order. Either way ``state_dict`` holds the windows oldest first (a ring is rotated into that
order on save and back on load), so checkpoints are the same for both.
Constant operands are cached 0-dim tensors (:func:`mabn.groups.cached_constant`: a Python number
costs a tensor construction in every call) and dtype casts are skipped where nothing changes.
The kernels get arguments that both their CPU and CUDA implementations accept
(``save_mean``/``save_invstd`` given, the backward's ``save_invstd`` empty in eval mode where the
kernels derive it from the running variance, a weight wherever a weight gradient is requested,
float32 parameters next to float16/bfloat16 input).

Loss scaling: ``grad_scale`` (set by :func:`mabn.set_grad_scale` before the forward; None for 1)
is the factor the incoming gradients carry. ``psi`` enters the window divided by it, so the
window stays valid when a GradScaler changes its scale (:mod:`mabn.loss_scale`).

Non-finite statistics are dropped per channel: where the forward's ``chi`` (averaged over the
forward's groups) is NaN or infinite (a NaN pixel, an input whose square overflows), that
channel's ``running_var`` and ``buffer_x2`` keep their values and ``skipped_updates`` counts one;
where the backward's ``psi`` is not finite (non-finite gradient), that channel's ``buffer_gz``
keeps its values (not counted: a buffer updated in both passes breaks ``torch.compile``'s
partitioner). The counters ``num_batches_tracked`` and ``groups_seen`` advance regardless (in a
ring the skipped row then keeps its older value for another W groups), and the output and
gradient of such a channel are whatever the non-finite input makes them (a ring layer normalizes
it with the window's other values). An empty batch (N = 0 or a zero-size spatial dim) returns an
empty output and changes no buffer.

Activation checkpointing: recomputing a training forward advances the counters and the ``chi``
window a second time (the backward's ``psi`` window advances once per backward). Do not wrap
MABN layers in ``torch.utils.checkpoint``, or put them in eval mode for the recomputation.
"""
from __future__ import annotations

import math
import os

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from mabn.compile_barrier import saved_for_backward
from mabn.groups import cached_constant, check_norm_input, count_groups, filled, scalar
from mabn.host_counters import HostCounters
from mabn.precision import cast, statistics_dtype

__all__ = ["MABN1d", "MABN2d", "MABN3d"]

_WINDOWS = ("buffer_x2", "buffer_gz")


class _Operands(NamedTuple):
    """The constant operands of one training forward, as tensors cached together (one cache lookup
    per forward): 0-dim ``eps`` and inf in the statistics dtype, the (C,) clamp factors ``1 /
    r_max ** 2`` and ``r_max ** 2`` of the variance, the EMA weight ``1 - momentum``, the counter
    increments (1 forward, G groups, C channels) and an empty tensor (the one-group backward
    kernel's ``save_invstd``). Tensor operands, not Python numbers: a number is wrapped into a
    new tensor in every call of a CPU kernel, and a ``_foreach`` op over (C,) tensors of one
    shape stays on CUDA's multi-tensor kernel."""

    eps: Tensor
    inf: Tensor
    clamp_factors: List[Tensor]
    ema_weight: Tensor
    steps: List[Tensor]
    empty: Tensor


def _operands(layer: "_MovingAverageBatchNorm", dtype: torch.dtype, groups: int, device: torch.device) -> _Operands:
    buffer_dtype, channels = layer._buffers["running_var"].dtype, layer.num_features
    eps, momentum, r_max = layer.eps, layer.momentum, layer.r_max

    def build(d: torch.device) -> _Operands:
        def scalar(value: float, kind: torch.dtype) -> Tensor:
            return torch.tensor(value, dtype=kind, device=d)

        return _Operands(scalar(eps, dtype), scalar(math.inf, dtype),
                         [torch.full((channels,), factor, dtype=dtype, device=d) for factor in (1.0 / r_max ** 2, r_max ** 2)],
                         scalar(1.0 - momentum, buffer_dtype), [scalar(n, torch.long) for n in (1, groups, channels)],
                         torch.empty(0, dtype=dtype, device=d))

    return cached_constant(("operands", eps, momentum, r_max, dtype, buffer_dtype, groups, channels), device, build)


def _second_moments(x: Tensor, groups: int, zeros: Tensor) -> Tensor:
    """Mean of ``x ** 2`` per channel, (C,), or per group and channel, (G, C), in the dtype of
    ``zeros`` (the statistics dtype).

    BN's backward reduction ``sum(dy * (x - mean) * invstd)`` with ``dy = x``, ``mean = 0`` and
    ``invstd = 1 / count`` is this mean in one fast kernel, accumulated in float32 or wider
    for every input dtype (a strided ``vector_norm`` over (N, *) is several times slower on CPU).
    The kernel's ``weight`` only sets the dtype and device of the result (no input gradient is
    asked for), but CUDA needs one whenever a weight gradient is: ``inv_count`` serves. The
    constant tensors are cached (:func:`mabn.groups.filled`).
    """
    batch, channels = x.shape[0], x.shape[1]
    count = x.numel() // (groups * channels)
    if groups == 1:
        planes, rows = x, channels
    else:
        planes, rows = x.reshape(1, batch * channels, -1), batch * channels
        zeros = filled(rows, 0.0, zeros.dtype, x.device)
    inv_count = filled(rows, 1.0 / count, zeros.dtype, x.device)
    moments = torch.ops.aten.native_batch_norm_backward(
        planes, planes, inv_count, None, None, zeros, inv_count, True, 0.0, [False, True, False])[1]
    return moments if groups == 1 else moments.view(groups, -1, channels).sum(dim=1)


def _averaging_matrix(window: int, groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(G, W + G): row ``k`` averages rows ``k + 1 .. k + W`` of a stream of W + G values."""
    def build(d: torch.device) -> Tensor:
        rows = torch.arange(groups, device=d).unsqueeze(1)
        columns = torch.arange(window + groups, device=d)
        inside = (columns > rows) & (columns <= rows + window)
        return inside.to(dtype) / window

    return cached_constant(("averaging", window, groups, dtype), device, build)


def _windowed(window: Tensor, values: Tensor, use_own: Union[bool, Tensor]) -> Tuple[Tensor, Tensor]:
    """Apply the statistic rule to a stream of per-group values.

    ``window`` (W, C) holds the last W values of the stream, oldest first; ``values`` are the
    next G values, (G, C), or (C,) for one group. Returns the value to use for each group (its
    own where ``use_own``, else the mean of the W values ending at it), shaped like ``values``,
    and the window after appending them. ``use_own`` is a bool when the schedule is known on the
    host (no mean, or no select, is dispatched), else a mask tensor.
    """
    size = window.shape[0]
    if values.dim() == 1:
        # one kernel (the slice and unsqueeze are views); on the CPU a third of the time of stacking
        # W unbound rows, and one fused copy when compiled
        new_window = torch.cat([window[1:], values[None]])
        if use_own is True:
            return values, new_window
        moving = new_window.mean(dim=0)
    else:
        stream = torch.cat([window, values])
        new_window = stream[values.shape[0]:]
        if use_own is True:
            return values, new_window
        # the W-wide means ending at each new value: one product with a cached averaging matrix
        moving = torch.mm(_averaging_matrix(size, values.shape[0], stream.dtype, stream.device), stream)
    if use_own is False:
        return moving, new_window
    return torch.where(use_own, values, moving), new_window


def _ring_write(window: Tensor, values: Tensor, finite: Tensor, slot: Union[int, Tensor]) -> None:
    """Write (C,) ``values`` into row ``slot`` of the (W, C) ring ``window``, except in the channels
    that are not ``finite``. An int slot (known on the host) is one row view; a 0-dim tensor slot
    selects the row with a mask (no host sync)."""
    values = cast(values, window.dtype)
    if isinstance(slot, int):
        row = window[slot]
        torch.where(finite, values, row, out=row)
        return
    rows = cached_constant(("ring_rows", window.shape[0]), window.device,
                           lambda d: torch.arange(window.shape[0], device=d).unsqueeze(1))
    torch.where(torch.eq(rows, slot) & finite, values, window, out=window)


def _ring_average(window: Tensor, values: Tensor, use_own: Union[bool, Tensor]) -> Tensor:
    """The statistic rule on a ring that already holds ``values``: ``values`` where ``use_own``,
    else the mean of the ring (the last W values, in any order), in the dtype of ``values``."""
    if use_own is True:
        return values
    moving = window.mean(dim=0, dtype=values.dtype)
    return moving if use_own is False else torch.where(use_own, values, moving)


def _ring_rows(groups_seen: Tensor, window: int, shift: int) -> Tensor:
    """Row indices ``(i + shift * groups_seen) % W`` for ``i`` in ``0 .. W - 1``: with ``shift`` 1
    they read a ring oldest first, with -1 they place an oldest-first window into the ring."""
    positions = torch.arange(window, device=groups_seen.device)
    return torch.remainder(positions + shift * groups_seen, window)


def _group_view(t: Tensor, groups: int) -> Tensor:
    """(N, C, *S) as (G, N / G, C, prod(S)): a view for contiguous and channels-last tensors."""
    return t.reshape(groups, t.shape[0] // groups, t.shape[1], -1)


def _per_group(coefficients: Tensor) -> Tensor:
    """(G, C) coefficients as (G, 1, C, 1), broadcasting over :func:`_group_view`."""
    return coefficients.view(coefficients.shape[0], 1, coefficients.shape[1], 1)


class _Schedule(NamedTuple):
    """The branches of one training forward: each group's own statistic (``use_own``), the
    renormalization on (``r_on``), and the weight of the new value in the ``running_var`` EMA.
    Python values where the step counters are known on the host (no op is dispatched for a
    decided branch), else tensors computed from the counter buffers. ``own_groups``: on the
    host, how many leading groups use their own statistic (the rule holds for a prefix of the
    groups), else None."""

    use_own: Union[bool, Tensor]
    r_on: Union[bool, Tensor]
    ema_weight: Union[float, Tensor]
    own_groups: Optional[int] = None


def _host_schedule(layer: "_MovingAverageBatchNorm", forwards: int, groups_seen: int, groups: int,
                   device: torch.device) -> _Schedule:
    """:class:`_Schedule` from the counters' values: group ``k`` of this forward uses its own
    statistic while ``groups_seen + k < W`` or the forward is within ``warmup_iters``."""
    if groups_seen >= layer.window and forwards >= layer.settled_after:
        return _Schedule(False, True, 1.0 - layer.momentum, 0)
    in_warmup = forwards < layer.warmup_iters - 1
    own = tuple(in_warmup or groups_seen + k < layer.window for k in range(groups))
    if all(own) or not any(own):
        use_own: Union[bool, Tensor] = own[0]
    else:
        use_own = cached_constant(("own", own), device, lambda d: torch.tensor(own, device=d).unsqueeze(1))
    first = layer.first_batch_running_var and forwards == 0
    return _Schedule(use_own, forwards >= layer.r_warmup_iters, 1.0 if first else 1.0 - layer.momentum, sum(own))


def _device_schedule(layer: "_MovingAverageBatchNorm", groups: int, device: torch.device) -> _Schedule:
    """:class:`_Schedule` as tensors on the counter buffers; comparisons that the configuration
    decides (a warm-up already over at the first forward) are not dispatched."""
    window, num_batches_tracked = layer.window, layer.num_batches_tracked
    if groups == 1:
        limit = window
    else:
        limit = cached_constant(("limits", window, groups), device,
                                lambda d: torch.arange(window, window - groups, -1, device=d).unsqueeze(1))
    use_own = layer.groups_seen < limit
    if layer.warmup_iters > 1:
        use_own = use_own | (num_batches_tracked < layer.warmup_iters - 1)
    r_on = True if layer.r_warmup_iters <= 0 else num_batches_tracked >= layer.r_warmup_iters
    ema_weight: Union[float, Tensor] = 1.0 - layer.momentum
    if layer.first_batch_running_var:
        ema_weight = torch.where(num_batches_tracked == 0, layer.running_var.new_ones(()), ema_weight)
    return _Schedule(use_own, r_on, ema_weight)


@torch.no_grad()
def _advance_forward_statistics(layer: "_MovingAverageBatchNorm", x: Tensor, zeros: Tensor,
                                groups: int) -> Tuple[Optional[Tensor], Tensor, Tensor, Union[bool, Tensor],
                                                      Optional[Union[int, Tensor]], Optional[int]]:
    """One training forward's statistics; advances ``layer``'s buffers (``running_var``,
    ``num_batches_tracked``, ``groups_seen``, ``skipped_updates``, the window ``buffer_x2``) in place,
    except for channels whose statistic is not finite (counted in ``skipped_updates``), following
    its schedule settings (``warmup_iters``, ``r_warmup_iters``, ``eps``, ``r_max``, ``momentum``,
    ``first_batch_running_var``).

    Returns, per channel (C,) for one group or (G, C): ``var = (chi + eps) / r ** 2``, the
    denominator of the forward (``y = weight * x / sqrt(var) + bias``), ``u = 1 / sqrt(var)``
    (with one group an empty tensor: the backward kernel derives it), ``chi + eps``, the
    own-statistic rule (a bool, or a 0-dim or (G, 1) mask), the ring slot this forward
    wrote (an int, a 0-dim tensor, or None for a shifting window: ``split_batch`` layers), and
    where the fused kernels ran (:mod:`mabn.fused_statistics`) the number of leading groups that
    use their own statistic, else None. A fused forward of several groups returns ``var`` None
    (the layer needs only ``u``).
    """
    # buffers read from the dict that holds them: nn.Module.__getattr__ costs about a microsecond
    # an access, and a layer on a small map takes a dozen in every step
    buffers = layer._buffers
    running_var, chi_window, skipped = buffers["running_var"], buffers["buffer_x2"], buffers["skipped_updates"]
    counters = (buffers["num_batches_tracked"], buffers["groups_seen"])
    known = layer.host_counters.known(counters)
    if known is None:
        schedule = _device_schedule(layer, groups, x.device)
    else:
        schedule = _host_schedule(layer, known[0], known[1], groups, x.device)
    chi = _second_moments(x, groups, zeros)
    operands = _operands(layer, chi.dtype, groups, x.device)
    if known is not None and _uses_fused_statistics(layer, groups, x.device):
        return _fused_forward_statistics(layer, chi, groups, operands, schedule, known)
    slot: Optional[Union[int, Tensor]] = None
    if layer.split_batch:
        chi_used, new_window = _windowed(chi_window, chi, schedule.use_own)
        target = chi_used if groups == 1 else chi_used.mean(dim=0)
        finite = torch.lt(target, operands.inf)  # one kernel; target >= 0 unless NaN
        torch.where(finite, cast(new_window, chi_window.dtype), chi_window, out=chi_window)
    else:
        # the ring's next slot holds its oldest value: groups_seen % W
        slot = known[1] % layer.window if known is not None else torch.remainder(counters[1], layer.window)
        finite = torch.lt(chi, operands.inf)
        _ring_write(chi_window, chi, finite, slot)
        chi_used = target = _ring_average(chi_window, chi, schedule.use_own)

    # r = sqrt(chi_plus_eps / (running_var + eps)) clamped to [1/r_max, r_max], so
    # var = chi_plus_eps / r ** 2 is running_var + eps clamped to chi_plus_eps * [1/r_max^2, r_max^2]
    if schedule.r_on is False:
        chi_plus_eps = var = torch.add(chi_used, operands.eps)
    else:
        # independent elementwise ops share one dispatch (one kernel per dtype on a GPU); eps is a
        # number here: the CPU fallback of _foreach_add's tensor-scalar overload reads it with .item()
        chi_plus_eps, running_var_plus_eps = torch._foreach_add([chi_used, running_var], layer.eps)
        var = torch.clamp(running_var_plus_eps,
                          *torch._foreach_mul([chi_plus_eps, chi_plus_eps], operands.clamp_factors))
        if schedule.r_on is not True:
            var = torch.where(schedule.r_on, var, chi_plus_eps)

    ema_weight = schedule.ema_weight
    if not isinstance(ema_weight, Tensor):  # 1 - momentum, or 1 at the first forward
        ema_weight = operands.ema_weight if ema_weight != 1.0 else scalar(1.0, running_var.dtype, x.device)
    # _cast: no op unless the buffers are in float16/bfloat16 (a model converted as a whole)
    torch.where(finite, torch.lerp(running_var, cast(target, running_var.dtype), ema_weight), running_var,
                out=running_var)
    torch._foreach_add_([*counters, skipped], operands.steps)
    skipped.sub_(finite.sum())
    if known is not None:
        layer.host_counters.record(counters, (known[0] + 1, known[1] + groups))
    # tensors the backward reads pass saved_for_backward: a compiled backward must not recompute
    # them from the counters this forward has advanced
    use_own = schedule.use_own
    flags = [t for t in (use_own, slot) if isinstance(t, Tensor)]
    if groups == 1:
        # u is the backward kernel's save_invstd: empty, so that it derives 1 / sqrt(var + 0) from
        # the running statistics itself (eval mode), on CPU and on CUDA (no rsqrt op here)
        var, chi_plus_eps, *flags = saved_for_backward(var, chi_plus_eps, *flags)
        u = operands.empty
    else:
        var, u, chi_plus_eps, *flags = saved_for_backward(var, var.rsqrt(), chi_plus_eps, *flags)
    if isinstance(use_own, Tensor):
        use_own = flags.pop(0)
    if isinstance(slot, Tensor):
        slot = flags.pop(0)
    return var, u, chi_plus_eps, use_own, slot, None


def _fused_kernels_run_on(device: torch.device) -> bool:
    """Whether :mod:`mabn.fused_statistics` runs on ``device``: CUDA, or the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _uses_fused_statistics(layer: "_MovingAverageBatchNorm", groups: int, device: torch.device) -> bool:
    """Whether this training forward runs the fused kernels: asked for, a ring layer or a
    ``split_batch`` forward of several groups, eager (``torch.compile`` fuses the tensor logic
    itself) and a device they run on. The caller knows the counters on the host."""
    return (layer.fused_statistics and (groups > 1 or not layer.split_batch) and not torch.compiler.is_compiling()
            and _fused_kernels_run_on(device))


def _fused_kernels():
    """:mod:`mabn.fused_statistics`, imported on first use (it needs Triton)."""
    try:
        import mabn.fused_statistics as fused_statistics
    except ImportError as error:
        raise RuntimeError(f"MABN's fused_statistics=True needs Triton ({error}); install the triton package that "
                           f"matches your torch, or build the layer with fused_statistics=False") from error
    return fused_statistics


def _fused_forward_statistics(layer: "_MovingAverageBatchNorm", chi: Tensor, groups: int, operands: _Operands,
                              schedule: _Schedule, known: Tuple[int, int]):
    """:func:`_advance_forward_statistics` in one kernel (:mod:`mabn.fused_statistics`): a ring
    layer's ``var``, or (``var`` None) a ``split_batch`` forward's per-group ``u``."""
    buffers = layer._buffers
    running_var = buffers["running_var"]
    ema_weight = operands.ema_weight if schedule.ema_weight != 1.0 else scalar(1.0, running_var.dtype, chi.device)
    counters = (buffers["num_batches_tracked"], buffers["groups_seen"])
    arguments = (buffers["buffer_x2"], running_var, operands.eps, operands.clamp_factors, ema_weight,
                 (*counters, buffers["skipped_updates"]))
    if groups == 1:
        slot: Optional[int] = known[1] % layer.window
        var, chi_plus_eps = _fused_kernels().forward_statistics(chi, *arguments, slot, bool(schedule.use_own),
                                                                bool(schedule.r_on))
        u = operands.empty
    else:
        slot, var = None, None
        u, chi_plus_eps = _fused_kernels().grouped_forward_statistics(chi, *arguments, schedule.own_groups,
                                                                      bool(schedule.r_on))
    layer.host_counters.record(counters, (known[0] + 1, known[1] + groups))
    return var, u, chi_plus_eps, schedule.use_own, slot, schedule.own_groups


class _MABNFunction(torch.autograd.Function):
    """``y = weight * u * x + bias`` with MABN's moving-average backward.

    ``u = r / sqrt(chi + eps) = 1 / sqrt(var)`` and ``chi + eps`` are constants per channel
    (C,) for one group, or per group (G, C). With one group, the forward is BN's inference
    kernel with variance ``var`` and mean 0, and the backward is one call of BN's inference
    backward: ``dy * weight * u`` and the weight and bias gradients. With several groups ``x``
    is the (G, B, C, S) view of the input, scaled by per-group coefficients (broadcast, no
    copies). The backward averages ``psi`` over the window in ``psi_window`` (updated in place).

    ``grad_scale`` (0-dim, or None for 1) is the factor the incoming gradient carries (a
    GradScaler's loss scale): ``psi`` enters the window divided by it, and the averaged ``psi``
    is multiplied by it again where it meets the scaled gradient.

    ``fused`` (None where the forward ran the eager ops) is the number of leading groups that use
    their own ``psi``: the backward's window bookkeeping then runs as one kernel
    (:mod:`mabn.fused_statistics`), as the forward's did.

    Batch-norm kernels get arguments that both the CPU and the CUDA kernels accept: parameters
    and statistics in the statistics dtype (float32 next to float16/bfloat16 input: the kernels'
    mixed-precision mode), ``save_mean``/``save_invstd`` always given, and a weight wherever a
    weight gradient is requested.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, zeros: Tensor, var: Tensor, u: Tensor,
                chi_plus_eps: Tensor, use_own: Union[bool, Tensor], psi_window: Tensor,
                grad_scale: Optional[Tensor], slot: Optional[Union[int, Tensor]], fused: Optional[int]) -> Tensor:
        compute_dtype = zeros.dtype
        ctx.fused = fused
        ctx.use_own = use_own if isinstance(use_own, bool) else None
        use_own = None if isinstance(use_own, bool) else use_own
        ctx.slot = None if isinstance(slot, Tensor) else slot
        slot = slot if isinstance(slot, Tensor) else None
        if chi_plus_eps.dim() == 1:
            ctx.save_for_backward(x, weight, zeros, var, u, chi_plus_eps, use_own, psi_window, grad_scale, slot)
            return torch.native_batch_norm(x, cast(weight, compute_dtype), cast(bias, compute_dtype), zeros, var,
                                           False, 0.0, 0.0)[0]
        # x is the (G, B, C, S) view of the input; the output takes its layout (channels-last stays so)
        weight_u = _per_group(cast(weight, compute_dtype) * u)  # saved: the backward scales dy by it too
        ctx.save_for_backward(x, weight, zeros, weight_u, u, chi_plus_eps, use_own, psi_window, grad_scale, slot)
        y = torch.addcmul(cast(bias, compute_dtype).view(1, 1, -1, 1), cast(x, compute_dtype), weight_u)
        return cast(y, x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # var_or_weight_u: var (C,) with one group, weight * u (G, 1, C, 1) with several
        x, weight, zeros, var_or_weight_u, u, chi_plus_eps, use_own, psi_window, grad_scale, slot = ctx.saved_tensors
        if ctx.use_own is not None:
            use_own = ctx.use_own
        if ctx.slot is not None:
            slot = ctx.slot
        compute_dtype = zeros.dtype
        one_group = var_or_weight_u.dim() == 1
        groups, channels = (1, x.shape[1]) if one_group else (x.shape[0], x.shape[2])
        count = x.numel() // (channels * groups)
        weight_c = cast(weight, compute_dtype)
        if one_group:
            # BN's inference backward with mean 0 and variance var (eps 0): dy * weight * u, and
            # the reductions sum(dy * x * u), sum(dy); save_mean equals the running mean and
            # save_invstd is empty, so both devices derive u from the running variance.
            grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight_c, zeros, var_or_weight_u, zeros, u, False, 0.0, [True, True, True])
            if ctx.fused is not None:
                coefficient = _fused_kernels().backward_coefficient(grad_weight, weight_c, grad_scale, chi_plus_eps,
                                                                    psi_window, count, slot, use_own)
                grad_x.addcmul_(x, coefficient.view((channels,) + (1,) * (x.dim() - 2)), value=-1.0)
                return (grad_x, cast(grad_weight, weight.dtype), cast(grad_bias, weight.dtype),
                        None, None, None, None, None, None, None, None, None)
            weight_unscaled = weight_c if grad_scale is None else weight_c / grad_scale
            psi = torch.addcmul(zeros, grad_weight, weight_unscaled, value=1.0 / count)
            finite = torch.lt(psi.abs(), scalar(math.inf, compute_dtype, x.device))
            if slot is None:
                psi_used, new_window = _windowed(psi_window, psi, use_own)
                torch.where(finite, cast(new_window, psi_window.dtype), psi_window, out=psi_window)
            else:
                _ring_write(psi_window, psi, finite, slot)
                psi_used = _ring_average(psi_window, psi, use_own)
            coefficient = psi_used / chi_plus_eps
            if grad_scale is not None:
                coefficient = coefficient * grad_scale
            grad_x.addcmul_(x, coefficient.view((channels,) + (1,) * (x.dim() - 2)), value=-1.0)
        else:
            x4, grad4 = cast(x, compute_dtype), cast(grad_out, compute_dtype)
            rows = x4.shape[0] * x4.shape[1] * channels
            planes = (1, rows, x4.shape[3])
            # per (sample, channel) row: sum(dy * x) and sum(dy) (invstd 1, cached); the weight
            # only sets the dtype of the sums (no input gradient is asked for)
            ones = filled(rows, 1.0, compute_dtype, x.device)
            _, grad_x_sums, grad_sums = torch.ops.aten.native_batch_norm_backward(
                grad4.reshape(planes), x4.reshape(planes), ones, None, None,
                filled(rows, 0.0, compute_dtype, x.device), ones, True, 0.0, [False, True, True])
            if ctx.fused is not None:
                grad_weight, grad_bias, coefficient = _fused_kernels().grouped_backward(
                    grad_x_sums, grad_sums, u, weight_c, grad_scale, chi_plus_eps, psi_window, count, ctx.fused)
            else:
                per_group = grad_x_sums.view(groups, -1, channels).sum(dim=1).mul_(u)  # sum(dy * x * u)
                grad_weight = per_group.sum(dim=0)
                grad_bias = grad_sums.view(-1, channels).sum(dim=0)
                weight_unscaled = weight_c if grad_scale is None else weight_c / grad_scale
                psi = torch.addcmul(zeros, per_group, weight_unscaled, value=1.0 / count)
                finite = torch.lt(torch.linalg.vector_norm(psi, math.inf, dim=0),  # NaN stays NaN
                                  scalar(math.inf, compute_dtype, x.device))
                psi_used, new_window = _windowed(psi_window, psi, use_own)
                torch.where(finite, cast(new_window, psi_window.dtype), psi_window, out=psi_window)
                coefficient = psi_used / chi_plus_eps
                if grad_scale is not None:
                    coefficient = coefficient * grad_scale
            grad_x = (grad4 * var_or_weight_u).addcmul_(x4, _per_group(coefficient), value=-1.0)
            grad_x = cast(grad_x, x.dtype)
        return (grad_x, cast(grad_weight, weight.dtype), cast(grad_bias, weight.dtype),
                None, None, None, None, None, None, None, None, None)


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
        first_batch_running_var: ``running_var`` starts from the first training forward's
            statistic instead of 1 (the published ImageNet layer's rule).
        fused_statistics: run the per-channel bookkeeping as one Triton kernel per pass on CUDA
            (:mod:`mabn.fused_statistics`; needs Triton). Steps whose counters are not known on
            the host (see :mod:`mabn.host_counters`: after a DDP buffer broadcast, say), a
            ``split_batch`` forward of one group, other devices and ``torch.compile`` use the
            eager ops. Opt-in: checked against the eager path under Triton's interpreter
            on the CPU, not yet measured on a GPU.
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
        first_batch_running_var: bool = False,
        fused_statistics: bool = False,
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
        self.first_batch_running_var = first_batch_running_var
        self.fused_statistics = fused_statistics
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("groups_seen", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("buffer_x2", torch.zeros(self.window, num_features, **factory))
        self.register_buffer("buffer_gz", torch.zeros(self.window, num_features, **factory))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long, device=device))
        # the loss scale the coming backward's gradients carry, None for 1 (mabn.set_grad_scale)
        self.grad_scale: Optional[Tensor] = None
        # num_batches_tracked and groups_seen as known on the host (mabn.host_counters)
        self.host_counters = HostCounters()
        self.host_counters.record(self._step_counters(), (0, 0))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, "groups_seen"):
            self.groups_seen.zero_()
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()
            self.skipped_updates.zero_()
            self.host_counters.record(self._step_counters(), (0, 0))

    @property
    def settled_after(self) -> int:
        """Training forwards after which the schedule no longer changes (once the window is full)."""
        return max(self.warmup_iters - 1, self.r_warmup_iters, 1 if self.first_batch_running_var else 0)

    def _step_counters(self) -> Tuple[Tensor, Tensor]:
        return self.num_batches_tracked, self.groups_seen

    def _apply(self, fn, recurse=True):
        """Moves and conversions keep the counters' values: the host copy follows the buffers."""
        known = self.host_counters.known(self._step_counters())
        module = super()._apply(fn, recurse)
        if known is not None:
            self.host_counters.record(self._step_counters(), known)
        return module

    def extra_repr(self) -> str:
        return (f"{self.num_features}, B={self.B}, real_B={self.real_B}, eps={self.eps}, "
                f"momentum={self.momentum}, warmup_iters={self.warmup_iters}, "
                f"split_batch={self.split_batch}, r_max={self.r_max}, "
                f"r_warmup_iters={self.r_warmup_iters}"
                + (", first_batch_running_var=True" if self.first_batch_running_var else "")
                + (", fused_statistics=True" if self.fused_statistics else ""))

    def _check_input_dim(self, input: Tensor) -> None:
        check_norm_input(type(self).__name__, self.num_features, self._expected_dims, input)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or input.numel() == 0:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        groups = count_groups(type(self).__name__, self.B if self.split_batch else None, input.shape[0])
        buffers = self._buffers  # see _advance_forward_statistics
        zeros = cast(buffers["running_mean"], statistics_dtype(input.dtype))
        # fused: where this forward ran the fused kernels, so that the backward does too
        var, u, chi_plus_eps, use_own, slot, fused = _advance_forward_statistics(self, input, zeros, groups)
        if groups == 1:
            return _MABNFunction.apply(input, self.weight, self.bias, zeros, var, u, chi_plus_eps,
                                       use_own, buffers["buffer_gz"], self.grad_scale, slot, fused)
        return _MABNFunction.apply(_group_view(input, groups), self.weight, self.bias, zeros, var, u, chi_plus_eps,
                                   use_own, buffers["buffer_gz"], self.grad_scale, slot, fused).reshape(input.shape)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The ring windows of a ``split_batch=False`` layer are saved oldest first (copies), the
        order of every saved window, so that checkpoints do not depend on the representation."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.split_batch:
            rows = _ring_rows(self.groups_seen, self.window, 1)
            for key in _WINDOWS:
                if prefix + key in destination:
                    destination[prefix + key] = destination[prefix + key].index_select(0, rows)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._upgrade_published_state(state_dict, prefix)
        if not self.split_batch:
            self._place_in_ring(state_dict, prefix)
        state_dict.setdefault(prefix + "skipped_updates", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # read once here (a device sync at load time), so that training steps need none
        self.host_counters.read(self._step_counters())

    def _place_in_ring(self, state_dict: dict, prefix: str) -> None:
        """Rewrite oldest-first windows of ``state_dict`` into ring order for its ``groups_seen``
        (a window of another length is left for the size check to report)."""
        groups_seen = state_dict.get(prefix + "groups_seen")
        if groups_seen is None:
            return
        rows = None
        for key in _WINDOWS:
            window = state_dict.get(prefix + key)
            if isinstance(window, Tensor) and window.dim() == 2 and window.shape[0] == self.window:
                if rows is None or rows.device != window.device:
                    rows = _ring_rows(groups_seen.to(window.device).reshape(()), self.window, -1)
                state_dict[prefix + key] = window.index_select(0, rows)

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
            for key in _WINDOWS:
                ring = state_dict[prefix + key]
                state_dict[prefix + key] = torch.roll(ring, shifts=-((iters + 1) % ring.shape[0]), dims=0)
            groups_seen = iters
        for key in _WINDOWS:
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
