"""SGD and the warm-up multi-step schedule from the ``SOLVER`` keys, as maskrcnn-benchmark set them.

Parameters named ``bias`` (convs, linears and the norms' betas) get ``BASE_LR * BIAS_LR_FACTOR``
and ``WEIGHT_DECAY_BIAS``; the others ``BASE_LR`` and ``WEIGHT_DECAY``. Frozen parameters
(``requires_grad`` False) are left out. Two parameter groups instead of the published one group
per parameter: the same updates, a smaller optimizer state. Each group records its ``lr_factor``,
so that :func:`set_optimizer_hyperparameters` can apply a changed config to a restored optimizer.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from yacs.config import CfgNode

from det.solver.lr_scheduler import solver_schedule
from mabn.utils.errors import UserError
from mabn.utils.lr_schedule import build_scheduler, position_scheduler

__all__ = ["make_optimizer", "make_lr_scheduler", "set_optimizer_hyperparameters"]


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def _check_solver(solver: CfgNode) -> None:
    if not solver.BASE_LR > 0:
        raise UserError(f"SOLVER.BASE_LR {solver.BASE_LR} must be positive")
    for key in ("BIAS_LR_FACTOR", "MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_BIAS"):
        if getattr(solver, key) < 0:
            raise UserError(f"SOLVER.{key} {getattr(solver, key)} must be >= 0")


def make_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters of ``model`` (bias / other groups)."""
    solver = cfg.SOLVER
    _check_solver(solver)
    weights: List[nn.Parameter] = []
    biases: List[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (biases if _is_bias(name) else weights).append(parameter)
    groups = [{"params": params, "is_bias": is_bias}
              for params, is_bias in ((weights, False), (biases, True)) if params]
    optimizer = torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM)
    set_optimizer_hyperparameters(cfg, optimizer)
    return optimizer


def set_optimizer_hyperparameters(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> None:
    """Write the config's rate factor, momentum and weight decay into every group (after a
    restored optimizer state brought back the old ones)."""
    solver = cfg.SOLVER
    _check_solver(solver)
    for group in optimizer.param_groups:
        group["lr_factor"] = solver.BIAS_LR_FACTOR if group["is_bias"] else 1.0
        group["weight_decay"] = solver.WEIGHT_DECAY_BIAS if group["is_bias"] else solver.WEIGHT_DECAY
        group["momentum"] = solver.MOMENTUM
        group["lr"] = group["initial_lr"] = solver.BASE_LR * group["lr_factor"]


def make_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer, start_iter: int = 0) -> LambdaLR:
    """The schedule of ``SOLVER.{STEPS, GAMMA, WARMUP_*}``, positioned at ``start_iter`` (the
    rate of ``optimizer``'s groups is set for that iteration)."""
    base_lrs = [cfg.SOLVER.BASE_LR * group.get("lr_factor", 1.0) for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = base
    scheduler = build_scheduler(optimizer, solver_schedule(cfg.SOLVER))
    if start_iter:
        position_scheduler(scheduler, start_iter, base_lrs)
    return scheduler
