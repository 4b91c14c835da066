"""Learning-rate schedules as pure functions of the step, for both trainers.

A schedule is a :class:`WarmupMultiStep` factor on each parameter group's base rate
(``initial_lr``), driven by ``torch.optim.lr_scheduler.LambdaLR``. Because the rate depends on the
step and the schedule's arguments only, a resumed run needs the step and nothing else: the
checkpoint's scheduler state is not read, so a changed learning rate or milestone applies at once,
and :func:`position_scheduler` touches only public attributes.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WARMUP_METHODS", "WarmupMultiStep", "build_scheduler", "position_scheduler"]

WARMUP_METHODS = ("constant", "linear")


@dataclass(frozen=True)
class WarmupMultiStep:
    """The factor on the base rate at ``step`` (0-based): ``gamma ** (milestones passed)``, times,
    during the first ``warmup_iters`` steps, ``warmup_factor`` ("constant") or a linear ramp from
    ``warmup_factor`` to 1 ("linear"), as in maskrcnn-benchmark. ``milestones`` are sorted."""

    milestones: Tuple[int, ...]
    gamma: float = 0.1
    warmup_factor: float = 1.0
    warmup_iters: int = 0
    warmup_method: str = "linear"

    def __post_init__(self) -> None:
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones {self.milestones} must be increasing")
        if self.warmup_method not in WARMUP_METHODS:
            raise ValueError(f"warmup method {self.warmup_method!r}: use one of {', '.join(WARMUP_METHODS)}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters {self.warmup_iters} must be >= 0")

    def __call__(self, step: int) -> float:
        warmup = 1.0
        if step < self.warmup_iters:
            if self.warmup_method == "constant":
                warmup = self.warmup_factor
            else:
                alpha = step / self.warmup_iters
                warmup = self.warmup_factor * (1 - alpha) + alpha
        return warmup * self.gamma ** bisect.bisect_right(self.milestones, step)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupMultiStep) -> LambdaLR:
    """``LambdaLR`` with rate ``initial_lr * schedule(step)`` for every parameter group (the
    groups' current ``lr`` becomes their ``initial_lr`` unless they have one)."""
    return LambdaLR(optimizer, schedule)


def position_scheduler(scheduler: LambdaLR, step: int, base_lrs: Sequence[float]) -> None:
    """Put ``scheduler`` and its optimizer's rates at ``step`` (completed steps) with these base
    rates: ``initial_lr`` and ``lr`` of each group, ``base_lrs`` and ``last_epoch``. The next
    ``scheduler.step()`` continues exactly as an uninterrupted run would."""
    groups = scheduler.optimizer.param_groups
    if len(base_lrs) != len(groups):
        raise ValueError(f"{len(base_lrs)} base rates for {len(groups)} parameter groups")
    scheduler.base_lrs = list(base_lrs)
    scheduler.last_epoch = step
    for group, base, factor in zip(groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(step)
