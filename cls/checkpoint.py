"""What a classification checkpoint holds, written and read through :mod:`mabn.utils.checkpoint`.

``checkpoint.pth`` holds the published keys (``model`` without the ``module.`` prefix,
``optimizer``, ``scheduler``, ``iteration`` = completed epochs) and what an exact resume needs:
``epoch`` and ``step_in_epoch`` (the position, also inside an epoch after a stop signal),
``global_step``, the running sums of the interrupted epoch (``meter``), the AMP scaler, the flags
of the run (``args``, a dict of builtins), the world size and, for every rank, its own buffers
(BN/MABN statistics differ per rank: DDP runs with ``broadcast_buffers=False``) and RNG states
(``rank_states``). Everything is tensors and builtins, so the file loads with
``weights_only=True``; nothing non-finite is ever written. A file with only the published keys
loads too (training continues at the next epoch; data order and buffers then cannot be exact).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from cls.engine import Trainer
from mabn.utils.checkpoint import (CHECKPOINT_NAME, check_fields, load_checkpoint, resolve_checkpoint_path,
                                   save_run_checkpoint)
from mabn.utils.run_log import RunLog

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "FIELDS", "flags_of", "read_training_checkpoint",
           "CheckpointWriter"]

CHECKPOINT_FORMAT = "mabn-cls-2"

# The type of every field a checkpoint may hold (absent fields are allowed: published files).
FIELDS: Dict[str, Any] = {
    "format": str, "model": Mapping, "optimizer": Mapping, "scheduler": Mapping, "iteration": int, "epoch": int,
    "step_in_epoch": int, "global_step": int, "iters_per_epoch": int, "meter": Mapping, "scaler": (Mapping, type(None)),
    "world_size": int, "rank_states": (list, type(None)), "args": Mapping,
}

_BUILTINS = (bool, int, float, str, type(None))


def flags_of(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's flags as a dict of builtins (lists of builtins for ``nargs`` flags)."""
    flags = {}
    for name, value in sorted(vars(args).items()):
        if name in ("explicit", "from_config"):
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, _BUILTINS) for v in value):
            flags[name] = list(value)
        elif isinstance(value, _BUILTINS):
            flags[name] = value
    return flags


def read_training_checkpoint(path: str, trusted: bool) -> Tuple[str, Dict[str, Any]]:
    """The file and contents of the checkpoint at ``path`` (a file or a folder holding
    ``checkpoint.pth``), with every field of :data:`FIELDS` checked for its type."""
    path = resolve_checkpoint_path(path, "--checkpoint_dir")
    checkpoint = load_checkpoint(path, trusted=trusted, trust_hint="--trust_checkpoint")
    check_fields(checkpoint, FIELDS, path)
    return path, checkpoint


class CheckpointWriter:
    """``writer()`` gathers every rank's buffers and RNG states, checks that everything is finite
    (on every rank, so all of them stop together) and lets rank 0 write ``<save>/checkpoint.pth``
    atomically."""

    def __init__(self, save_dir: str, network: nn.Module, trainer: Trainer, scheduler, flags: Dict[str, Any],
                 log: RunLog):
        self.path = os.path.join(save_dir, CHECKPOINT_NAME)
        self.network = network
        self.trainer = trainer
        self.scheduler = scheduler
        self.flags = flags
        self.log = log

    def contents(self, rank_states: Optional[list]) -> Dict[str, Any]:
        trainer, state = self.trainer, self.trainer.state
        scaler = trainer.precision.scaler
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.network.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": state.epoch,  # published key: completed epochs
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "iters_per_epoch": trainer.iters_per_epoch,
            "meter": state.meter.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "world_size": trainer.env.world_size,
            "rank_states": rank_states,
            "args": self.flags,
        }

    def __call__(self) -> None:
        env = self.trainer.env
        save_run_checkpoint(self.path, self.network, env, self.contents)
        if env.is_main:
            state = self.trainer.state
            self.log.info(f"saved checkpoint {self.path} (epoch {state.epoch}"
                          + (f", iteration {state.step_in_epoch}" if state.step_in_epoch else "") + ")")
