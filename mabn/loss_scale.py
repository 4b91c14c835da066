"""Loss scaling (``torch.amp.GradScaler``) and MABN's backward window.

MABN averages ``psi`` (the mean of ``dL/dx_hat * x_hat``) over the last ``real_B / B`` groups. With a
GradScaler every gradient carries the loss scale ``S``, and ``S`` changes during training (it
halves on every overflow and doubles after each growth interval). A window of raw values would
then mix scales and the correction would be off by up to 2x until the window refills. So the
layers keep ``psi`` unscaled: each MABN layer divides by the scale it is told before it enters
the window, and multiplies the averaged value by it again where it meets the scaled gradient.

A step whose gradients overflow is skipped by the scaler, and its ``psi`` values must not stay in
any window either: layers nearer the loss than the overflow saw finite gradients. The forward's
statistics of such a step stay: they describe the weights, which the skipped step leaves as they
were.

Usage, around a GradScaler training step (``mabn.utils.amp.Precision`` does this for the trainers)::

    sync = mabn.GradScaleSync(model)
    for images, targets in loader:
        sync.before_forward(scaler)          # the scale, as a device tensor: no host sync
        with torch.autocast("cuda", dtype=torch.float16):
            loss = criterion(model(images), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync.after_update(scaler)            # a skipped step takes its psi back out of the windows

Without a scaler nothing is needed: the layers assume a scale of 1.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from mabn.moving_average_bn import _MovingAverageBatchNorm

__all__ = ["GradScaleSync", "set_grad_scale"]


def _mabn_layers(model: nn.Module) -> List[_MovingAverageBatchNorm]:
    return [module for module in model.modules() if isinstance(module, _MovingAverageBatchNorm)]


def set_grad_scale(model: nn.Module, scale: Union[Tensor, float, None]) -> None:
    """Tell every MABN layer of ``model`` the factor the gradients of the coming backward carry.

    Call it before the forward (the layers save the value for their backward). ``scale`` is a
    0-dim tensor on the layers' device (no host sync), a float, or None for 1.
    """
    layers = _mabn_layers(model)
    if isinstance(scale, (int, float)):
        scale = None if scale == 1 else [torch.tensor(float(scale), device=layer.running_var.device)
                                         for layer in layers]
    for index, layer in enumerate(layers):
        layer.grad_scale = scale[index] if isinstance(scale, list) else scale


class GradScaleSync:
    """Keeps the MABN layers of ``model`` in step with a ``torch.amp.GradScaler``.

    :meth:`before_forward` passes the scaler's current scale to the layers and remembers their
    backward windows; :meth:`after_update` restores those windows when the scaler skipped the step
    (its scale went down). Both are device operations only. With a disabled scaler, or None, they
    do nothing.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = _mabn_layers(model)
        self._scale: Optional[Tensor] = None
        self._windows: List[Tensor] = []

    def before_forward(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        if scaler is None or not scaler.is_enabled() or not self.layers:
            self._scale = None
            return
        device = self.layers[0].running_var.device
        # GradScaler.scale multiplies by its scale tensor: exactly the scale, still on the device
        self._scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device))
        set_grad_scale(self.model, self._scale)
        windows = [layer.buffer_gz for layer in self.layers]
        if len(self._windows) != len(windows) or any(s.shape != w.shape or s.device != w.device
                                                     for s, w in zip(self._windows, windows)):
            self._windows = [torch.empty_like(window) for window in windows]
        torch._foreach_copy_(self._windows, windows)

    def after_update(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        if self._scale is None or scaler is None:
            return
        skipped = scaler.scale(torch.ones_like(self._scale)) < self._scale
        for layer, saved in zip(self.layers, self._windows):
            torch.where(skipped, saved, layer.buffer_gz, out=layer.buffer_gz)
        self._scale = None
