"""The detector's learning-rate schedule: multi-step decay after a linear or constant warm-up,
stepped once per iteration (``mabn.utils.lr_schedule``), from the ``SOLVER`` keys."""
from __future__ import annotations

from yacs.config import CfgNode

from mabn.utils.errors import UserError
from mabn.utils.lr_schedule import WARMUP_METHODS, WarmupMultiStep

__all__ = ["WARMUP_METHODS", "solver_schedule"]


def solver_schedule(solver: CfgNode) -> WarmupMultiStep:
    """``SOLVER.{STEPS, GAMMA, WARMUP_FACTOR, WARMUP_ITERS, WARMUP_METHOD}`` as a schedule; a
    bad value is a one-line :class:`UserError` naming the key."""
    milestones = tuple(int(step) for step in solver.STEPS)
    if list(milestones) != sorted(milestones):
        raise UserError(f"SOLVER.STEPS {milestones} must be increasing")
    if solver.WARMUP_METHOD not in WARMUP_METHODS:
        raise UserError(f"SOLVER.WARMUP_METHOD {solver.WARMUP_METHOD!r}: use one of {', '.join(WARMUP_METHODS)}")
    if solver.WARMUP_ITERS < 0:
        raise UserError(f"SOLVER.WARMUP_ITERS {solver.WARMUP_ITERS} must be >= 0")
    return WarmupMultiStep(milestones, solver.GAMMA, solver.WARMUP_FACTOR, solver.WARMUP_ITERS, solver.WARMUP_METHOD)
