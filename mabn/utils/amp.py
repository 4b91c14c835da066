"""Mixed precision for the trainers: autocast and loss scaling in one object.

Enabled: float16 autocast with a ``GradScaler`` on CUDA; bfloat16 autocast on the CPU (which has
no fast float16 and needs no loss scaling). Disabled: plain float32, ``backward`` and ``step`` as
usual.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["Precision"]


class Precision:
    """``autocast()`` around the forward, ``backward(loss)``, then ``step(optimizer)``."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device_type = device.type
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if enabled and device.type == "cuda" else None

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def grad_scale(self) -> float:
        """The factor the last backward's gradients carry (1 without a scaler)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, through the scaler (which skips steps with Inf gradients) when there is one."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
