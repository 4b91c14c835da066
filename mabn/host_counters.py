"""Step counters mirrored on the host, so that an eager training step takes its schedule branches
in Python instead of comparing counter buffers on the device.

MABN's schedule (each group's own statistic while the window fills, ``r = 1`` during the r
warm-up, the first forward's EMA weight) depends on counter buffers. Comparing them on the device
costs ops in every step (each a kernel launch on a GPU); reading them with ``.item()`` would
synchronize with the device. :class:`HostCounters` keeps a Python copy that the layer advances
together with its own in-place update of the buffers, and trusts the copy only while the buffers
are the same tensor objects at the version the layer recorded (``Tensor._version`` counts every
in-place change: ``load_state_dict``, a DDP buffer broadcast, a user's ``zero_()``). A copy that
is not trusted is read again when the buffers are on the CPU (no device to wait for); on other
devices the layer uses its tensor logic until it records values it knows (construction,
``reset_running_stats``, ``load_state_dict``, a move with ``.to()``). Under ``torch.compile``,
fake tensors or a CUDA graph capture the copy is never used: those trace the tensor logic.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from mabn.tracing import tracing

__all__ = ["HostCounters"]


def _traced(tensor: Tensor) -> bool:
    """:func:`mabn.tracing.tracing` on the tensor's device, or ``tensor`` is a tensor subclass
    (fake, functional, distributed): host-side values must not decide anything."""
    return type(tensor) is not torch.Tensor or tracing(tensor.device)


class HostCounters:
    """The values of some 0-dim integer buffers, known on the host while they are trusted."""

    def __init__(self) -> None:
        self._values: Optional[Tuple[int, ...]] = None
        self._tensors: Tuple[Tensor, ...] = ()
        self._versions: Tuple[int, ...] = ()

    def record(self, tensors: Sequence[Tensor], values: Sequence[int]) -> None:
        """``tensors`` hold ``values`` now (call right after writing them)."""
        self._tensors = tuple(tensors)
        self._versions = tuple(t._version for t in self._tensors)
        self._values = tuple(int(v) for v in values)

    def read(self, tensors: Sequence[Tensor]) -> None:
        """Record the values ``tensors`` hold now, read from them (a device sync where they live on
        a device); forget them instead while tracing or for meta tensors, which hold none."""
        if _traced(tensors[0]) or tensors[0].device.type == "meta":
            self.forget()
        else:
            self.record(tensors, [int(t) for t in tensors])

    def forget(self) -> None:
        self._values, self._tensors, self._versions = None, (), ()

    def known(self, tensors: Sequence[Tensor]) -> Optional[Tuple[int, ...]]:
        """The values of ``tensors`` without a device sync, or None when they cannot be known so
        (then the caller computes on the tensors)."""
        if _traced(tensors[0]):
            return None
        if (self._values is not None and len(tensors) == len(self._tensors)
                and all(t is mine and t._version == version
                        for t, mine, version in zip(tensors, self._tensors, self._versions))):
            return self._values
        if all(t.device.type == "cpu" for t in tensors):
            self.read(tensors)
            return self._values
        self.forget()
        return None
