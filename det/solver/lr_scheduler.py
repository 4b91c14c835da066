"""Multi-step learning-rate decay after a linear or constant warm-up, stepped once per iteration."""
from __future__ import annotations

import bisect
from typing import List, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from mabn.utils.errors import UserError

__all__ = ["WARMUP_METHODS", "WarmupMultiStepLR", "warmup_multi_step_factor"]

WARMUP_METHODS = ("constant", "linear")


def warmup_multi_step_factor(iteration: int, milestones: Sequence[int], gamma: float, warmup_factor: float,
                             warmup_iters: int, warmup_method: str) -> float:
    """The factor on the base rate at ``iteration`` (0-based): ``gamma ** (milestones passed)``,
    times, during the first ``warmup_iters`` iterations, ``warmup_factor`` ("constant") or a
    linear ramp from ``warmup_factor`` to 1 ("linear"), as in maskrcnn-benchmark."""
    warmup = 1.0
    if iteration < warmup_iters:
        if warmup_method == "constant":
            warmup = warmup_factor
        else:
            alpha = iteration / warmup_iters
            warmup = warmup_factor * (1 - alpha) + alpha
    return warmup * gamma ** bisect.bisect_right(list(milestones), iteration)


class WarmupMultiStepLR(LRScheduler):
    """``lr = base_lr * warmup_multi_step_factor(last_epoch, ...)``; ``last_epoch`` counts
    iterations. The rate is a function of the iteration and the arguments only, so a resumed run
    needs nothing but the iteration (and may change the arguments)."""

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_factor: float = 1.0 / 3, warmup_iters: int = 500, warmup_method: str = "linear",
                 last_epoch: int = -1):
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise UserError(f"SOLVER.STEPS {tuple(milestones)} must be increasing")
        if warmup_method not in WARMUP_METHODS:
            raise UserError(f"SOLVER.WARMUP_METHOD {warmup_method!r}: use one of {', '.join(WARMUP_METHODS)}")
        if warmup_iters < 0:
            raise UserError(f"SOLVER.WARMUP_ITERS {warmup_iters} must be >= 0")
        self.milestones = milestones
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def factor(self, iteration: int) -> float:
        return warmup_multi_step_factor(iteration, self.milestones, self.gamma, self.warmup_factor,
                                        self.warmup_iters, self.warmup_method)

    def get_lr(self) -> List[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr
