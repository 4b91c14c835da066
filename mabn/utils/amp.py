"""Mixed precision for the trainers: autocast and loss scaling in one object.

Enabled: float16 autocast with a ``GradScaler`` on CUDA; bfloat16 autocast on the CPU (which has
no fast float16 and needs no loss scaling). Disabled: plain float32, ``backward`` and ``step`` as
usual. With a scaler, the MABN layers of the model given to :meth:`Precision.track` learn the
loss scale before every training forward and drop the window entries of steps the scaler skips
(:mod:`mabn.loss_scale`).
"""
from __future__ import annotations

import contextlib

from typing import Optional

import torch
from torch import nn

from mabn.loss_scale import GradScaleSync

__all__ = ["Precision"]


class Precision:
    """Per training step: ``before_forward()``, ``autocast()`` around the forward,
    ``backward(loss)``, then ``step(optimizer)``."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.device_type = device.type
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if enabled and device.type == "cuda" else None
        self._sync: Optional[GradScaleSync] = None

    def track(self, model: nn.Module) -> None:
        """Keep the MABN layers of ``model`` in step with the loss scale (nothing without a scaler)."""
        self._sync = GradScaleSync(model) if self.scaler is not None else None

    def before_forward(self) -> None:
        """Tell the tracked layers the scale of the coming backward (a device tensor, no sync)."""
        if self._sync is not None:
            self._sync.before_forward(self.scaler)

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
        if self._sync is not None:
            self._sync.after_update(self.scaler)
