"""Detection checkpoints: writing ``model_{iter:07d}.pth`` / ``model_final.pth`` with
``last_checkpoint``, and resuming from them.

A checkpoint holds the published keys ``model`` (no ``module.`` prefix), ``optimizer``,
``scheduler`` and ``iteration`` (completed iterations), plus ``config`` (the run's yacs config as
yaml text), ``world_size``, the AMP ``scaler`` and, per rank, its own buffers and RNG states
(``rank_states``: MABN/BN statistics differ per rank, DDP runs with ``broadcast_buffers=False``).
Everything is tensors and builtins, written atomically and only when every tensor is finite
(:mod:`mabn.utils.checkpoint`), and read with ``weights_only=True``. ``last_checkpoint`` holds the
file name of the newest checkpoint (maskrcnn-benchmark wrote a path; a path is accepted too,
relative to the working directory or absolute).

Resuming compares the checkpoint's config with this run's and logs every difference. Changes
that only affect the rest of the schedule, evaluation, logging or where files are
(:data:`APPLIED_KEYS`, :data:`APPLIED_PREFIXES`: the solver except the batch size, TEST.*, the
test-time sizes and thresholds, DATASETS.TEST/ROOT, workers, OUTPUT_DIR, MODEL.WEIGHT, which a
resume ignores, MODEL.DEVICE, DTYPE) are applied. Every other change alters the model's shapes
or what the exact resume depends on (the model and norm keys, the training data, its order and
batch size, the input convention, the number of processes) and is refused with one error line
naming each key; to fine-tune from a checkpoint with other values, start a new OUTPUT_DIR with
``MODEL.WEIGHT <checkpoint>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import yaml
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from yacs.config import CfgNode

from det.solver import set_optimizer_hyperparameters
from mabn.utils.checkpoint import (MALFORMED_ERRORS, check_fields, describe_error, kept_message, load_checkpoint,
                                   load_model_state, restore_rank_state, save_run_checkpoint, write_text_atomic)
from mabn.utils.distributed import DistEnv
from mabn.utils.errors import UserError
from mabn.utils.lr_schedule import position_scheduler

__all__ = ["APPLIED_KEYS", "APPLIED_PREFIXES", "FIELDS", "LAST_CHECKPOINT", "CheckpointWriter", "compare_configs",
           "find_last_checkpoint", "read_checkpoint", "restore_training_state", "restore_rank_state"]

LAST_CHECKPOINT = "last_checkpoint"
FORMAT = "mabn-det-1"
FIELDS: Dict[str, Any] = {"format": str, "model": Mapping, "optimizer": Mapping, "scheduler": Mapping,
                          "iteration": int, "config": str, "world_size": int, "scaler": (Mapping, type(None)),
                          "rank_states": (list, type(None))}
APPLIED_PREFIXES = ("SOLVER.", "TEST.")
APPLIED_KEYS = frozenset({
    "OUTPUT_DIR", "DTYPE", "MODEL.WEIGHT", "MODEL.DEVICE", "DATASETS.TEST", "DATASETS.ROOT", "DATALOADER.NUM_WORKERS",
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "MODEL.RPN.PRE_NMS_TOP_N_TEST", "MODEL.RPN.POST_NMS_TOP_N_TEST",
    "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "MODEL.ROI_HEADS.SCORE_THRESH", "MODEL.ROI_HEADS.NMS",
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMG",
})
REFUSED_SOLVER_KEYS = frozenset({"SOLVER.IMS_PER_BATCH"})


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping):
        flat: Dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: list(node) if isinstance(node, (list, tuple)) else node}


def is_applied(key: str) -> bool:
    return key not in REFUSED_SOLVER_KEYS and (key in APPLIED_KEYS or key.startswith(APPLIED_PREFIXES))


def compare_configs(saved_text: str, cfg: CfgNode, path: str, saved_world: Optional[int], world_size: int) -> List[str]:
    """One log line per config key that differs from the checkpoint's; :class:`UserError` naming
    every refused difference (see the module doc)."""
    try:
        saved = _flatten(yaml.safe_load(saved_text) or {})
    except yaml.YAMLError:
        raise UserError(f"checkpoint {path}: its config is not readable yaml; the file was edited") from None
    current = _flatten(yaml.safe_load(cfg.dump()))
    lines, refused = [], []
    for key in sorted(set(saved) | set(current)):
        if key not in saved or key not in current:
            where = "this version's" if key not in saved else "the checkpoint's"
            lines.append(f"config key {key} is only in {where} config (not checked)")
            continue
        if saved[key] == current[key]:
            continue
        if is_applied(key):
            lines.append(f"changed since the checkpoint: {key} {saved[key]} -> {current[key]} (applied)")
        else:
            refused.append(f"{key} {saved[key]} (now {current[key]})")
    if saved_world is not None and saved_world != world_size:
        refused.append(f"world size {saved_world} (now {world_size})")
    if refused:
        raise UserError(f"checkpoint {path} was trained with other values of keys that change the model or break "
                        f"the exact resume: {', '.join(refused)}; resume with the checkpoint's values, or train into "
                        f"a new OUTPUT_DIR with MODEL.WEIGHT {path}")
    return lines


def find_last_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint that ``<output_dir>/last_checkpoint`` names, or None without that file."""
    marker = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(marker):
        return None
    with open(marker) as stream:
        name = stream.read().strip()
    candidates = [name] if os.path.isabs(name) else [os.path.join(output_dir, name), name]
    for candidate in candidates:
        if name and os.path.isfile(candidate):
            return candidate
    raise UserError(f"{marker} names {name!r}, which does not exist; delete {marker} to start over, or restore "
                    f"the checkpoint file")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` (weights-only), with its fields' types checked."""
    checkpoint = load_checkpoint(path)
    check_fields(checkpoint, FIELDS, path)
    return checkpoint




def restore_training_state(checkpoint: Mapping[str, Any], path: str, cfg: CfgNode, network: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: LambdaLR, scaler) -> int:
    """Model, optimizer (with this config's hyperparameters written back), schedule position and
    scaler from ``checkpoint``; returns the iteration to start from."""
    load_model_state(network, checkpoint["model"], path, hint="another MODEL config?")
    iteration = int(checkpoint.get("iteration", 0))
    field = "optimizer"
    try:
        if "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        field = "scaler"
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
    except MALFORMED_ERRORS as exc:
        raise UserError(f"checkpoint {path}: the {field} state does not fit this run ({describe_error(exc)})") from None
    set_optimizer_hyperparameters(cfg, optimizer)
    position_scheduler(scheduler, iteration, [group["initial_lr"] for group in optimizer.param_groups])
    return iteration


@dataclass(eq=False)
class CheckpointWriter:
    """``writer(name, iteration)`` gathers every rank's buffers and RNG states, checks everything
    for NaN/Inf on every rank (so all of them stop together, writing nothing) and lets rank 0
    write ``<output_dir>/<name>.pth`` atomically, then ``last_checkpoint``. ``last_path`` and
    ``last_iteration`` name the newest checkpoint of the run (or the one it resumed from)."""

    output_dir: str
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: Any
    env: DistEnv
    config_text: str
    log: Any
    last_path: Optional[str] = field(default=None, init=False)
    last_iteration: Optional[int] = field(default=None, init=False)

    def kept(self) -> str:
        """What a stopped run leaves, for its error message."""
        return kept_message(self.last_path) if self.last_path else "no checkpoint was written by this run"

    def contents(self, iteration: int, rank_states: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "format": FORMAT, "model": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "iteration": iteration, "config": self.config_text,
            "world_size": self.env.world_size, "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rank_states": rank_states,
        }

    def __call__(self, name: str, iteration: int) -> str:
        path = os.path.join(self.output_dir, f"{name}.pth")
        save_run_checkpoint(path, self.network, self.env, lambda rank_states: self.contents(iteration, rank_states),
                            kept_path=self.last_path or path)
        if self.env.is_main:
            write_text_atomic(os.path.join(self.output_dir, LAST_CHECKPOINT), os.path.basename(path) + "\n")
            self.log.info(f"Saving checkpoint to {path} (iteration {iteration})")
        self.env.barrier()
        self.last_path, self.last_iteration = path, iteration
        return path
