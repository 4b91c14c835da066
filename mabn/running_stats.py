"""Running statistics that never take a non-finite value.

One NaN pixel, an inf, or finite values whose variance overflows would otherwise enter
``running_mean`` / ``running_var`` and poison every later evaluation. A layer that mixes in
:class:`FiniteRunningStats` computes each update into new tensors and commits it with
:meth:`FiniteRunningStats._commit_running_stats`: when any value of the new statistics is
non-finite, the WHOLE update of that forward is skipped (both buffers and
``num_batches_tracked`` unchanged, so the statistics stay one consistent snapshot) and the 0-dim
long buffer ``skipped_updates`` is incremented. The choice is made with ``torch.where`` on
tensors: no host sync, and ``torch.compile`` keeps it in the graph.

A state dict without ``skipped_updates`` (torch's BatchNorm, older checkpoints) loads strictly
with the counter at 0; ``reset_running_stats`` zeroes it. Layers leave every buffer unchanged
on an empty batch by not committing at all.
"""
from __future__ import annotations

import math

from typing import Any

import torch
from torch import Tensor

__all__ = ["FiniteRunningStats"]


class FiniteRunningStats:
    """Mixin placed before a ``_BatchNorm`` class in the bases: adds ``skipped_updates`` (when
    running statistics are tracked) and the commit that skips non-finite updates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        counter = None
        if self.track_running_stats:
            counter = torch.zeros((), dtype=torch.long, device=self.num_batches_tracked.device)
        self.register_buffer("skipped_updates", counter)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "skipped_updates", None) is not None:  # absent while _BatchNorm.__init__ runs
            self.skipped_updates.zero_()

    def _update_factor(self) -> float:
        """The update's weight of the new statistics: ``momentum``, or ``1 / (updates + 1)``
        (cumulative average, read on the host as torch's BatchNorm does) when it is None."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    @torch.no_grad()
    def _commit_running_stats(self, mean: Tensor, var: Tensor) -> None:
        """Copy ``mean``/``var`` into the running buffers and count the step, unless any value is
        non-finite: then nothing changes but ``skipped_updates``.

        Seven dispatched ops: the largest magnitude of both (NaN if any is NaN) compared with
        inf, two masked copies, and one fused update of both counters."""
        finite = torch.linalg.vector_norm(torch.cat([mean, var]), math.inf) < math.inf
        # .to(): no-ops unless the buffers are in float16/bfloat16 (a model converted as a whole)
        torch.where(finite, mean.to(self.running_mean.dtype), self.running_mean, out=self.running_mean)
        torch.where(finite, var.to(self.running_var.dtype), self.running_var, out=self.running_var)
        torch._foreach_add_([self.num_batches_tracked, self.skipped_updates], [finite, ~finite])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "skipped_updates"
        if getattr(self, "skipped_updates", None) is not None and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
