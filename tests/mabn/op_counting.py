"""Dispatched aten ops of one training step of a norm layer: the per-layer budgets of the layer
tests count with the benchmark's ``OpCounter``."""
from __future__ import annotations

import torch
from torch import nn

from benchmarks.harness import OpCounter

__all__ = ["training_step_ops"]


def training_step_ops(layer: nn.Module, batch: int, warmup_steps: int = 2) -> int:
    """Ops of one training forward + backward at (batch, 64, 7, 7) with an upstream gradient of
    ones, after ``warmup_steps`` steps on the same input (gradients accumulate, as in training;
    the engine's additions count too)."""
    x = torch.randn(batch, 64, 7, 7, requires_grad=True)
    for _ in range(warmup_steps):
        layer(x).sum().backward()
    grad = torch.ones_like(x)
    with OpCounter() as counter:
        layer(x).backward(grad)
    return counter.total
