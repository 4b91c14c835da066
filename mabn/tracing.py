"""Whether a trace is recording the current ops, so that host-side state must not be used.

Eager-mode shortcuts (cached constant tensors, counters known on the host) would be baked into a
trace as constants. :func:`tracing` tells them apart in a few cheap checks, since it runs several
times in every training step of a norm layer (``torch._guards.detect_fake_mode`` costs several
microseconds a call).
"""
from __future__ import annotations

import torch

__all__ = ["tracing"]

_get_dispatch_mode = torch._C._get_dispatch_mode
_TRACING_MODES = tuple(torch._C._TorchDispatchModeKey.__members__.values())  # fake, proxy, functional


def tracing(device: torch.device) -> bool:
    """A compiler, a tracing dispatch mode (fake, proxy, functional) or a CUDA graph capture on
    ``device`` is on."""
    if torch.compiler.is_compiling():
        return True
    for key in _TRACING_MODES:  # a loop, not any() over a generator: this runs in every layer call
        if _get_dispatch_mode(key) is not None:
            return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
