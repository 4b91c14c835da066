"""Resuming from a checkpoint: which changed flags are applied, which are refused, and the
restoring of the training state.

A checkpoint stores the flags it was trained with. On resume every difference is logged, and:

* :data:`APPLIED_FLAGS` change the rest of the run safely and are applied, also where the
  restored optimizer state would otherwise override them (momentum and weight decay are written
  into it; the learning rate is always the schedule of this run's ``--learning_rate`` and
  ``--lr_milestones`` at the restored epoch, ``mabn.utils.lr_schedule``);
* :data:`REFUSED_FLAGS` change the model's shapes or break the exact resume (data order,
  normalization groups, dataset): a run that changes any of them stops with exit 2 naming each
  flag with its old and new value. ``--iters_per_epoch`` is refused only inside an epoch, the
  world size always. With ``--test_only`` only the flags that decide the model
  (:data:`MODEL_FLAGS`) are refused.

Flags of neither list (added after the checkpoint was written) are logged as not checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR

from cls.engine import TrainState
from cls.metrics import Meter
from mabn.utils.amp import Precision
from mabn.utils.checkpoint import MALFORMED_ERRORS, describe_error
from mabn.utils.lr_schedule import position_scheduler
from mabn.utils.errors import UserError

__all__ = ["APPLIED_FLAGS", "REFUSED_FLAGS", "MODEL_FLAGS", "FlagChanges", "compare_flags", "apply_optimizer_flags",
           "restore_training_state"]

APPLIED_FLAGS = frozenset({
    "learning_rate", "lr_milestones", "momentum", "weight_decay", "total_epoch", "iters_per_epoch",
    "save_interval", "eval_interval", "log_interval", "workers", "progress", "val_batch_size", "export_folded",
    "record_statistics", "stat_channel", "stat_interval", "amp", "device", "save", "train_dir", "val_dir",
    "data_cache", "gpu_num", "mabn_fused_statistics",
})
REFUSED_FLAGS = frozenset({
    "batch_size", "seed", "arch", "norm", "norm_batch", "ma_batch", "warmup_iters", "mabn_r_warmup",
    "mabn_first_batch_var", "brn_warmup", "brn_r_ramp_end", "brn_d_ramp_end", "brn_r_max", "brn_d_max", "gn_groups",
    "num_classes", "image_size", "dataset", "data_seed", "synthetic_classes", "synthetic_train_per_class",
    "synthetic_val_per_class", "synthetic_image_size", "synthetic_difficulty",
})
MODEL_FLAGS = frozenset({"arch", "norm", "norm_batch", "ma_batch", "gn_groups", "num_classes"})
# Flags of one invocation, and values derived from others: never compared.
_NOT_COMPARED = frozenset({"checkpoint_dir", "test_only", "local_rank", "config", "overwrite", "trust_checkpoint",
                           "per_gpu_batch", "train_dir_used", "val_dir_used"})
_OPTIMIZER_FLAGS = ("learning_rate", "lr_milestones", "momentum", "weight_decay")


def _relevant(name: str, flags: Mapping[str, Any], test_only: bool) -> bool:
    """Whether a difference in ``name`` matters for a model/run with these ``flags``."""
    norm = flags.get("norm")
    if name in ("ma_batch", "warmup_iters", "mabn_r_warmup", "mabn_first_batch_var"):
        return norm == "mabn" and (name == "ma_batch" or not test_only)
    if name.startswith("brn_"):
        return norm == "brn" and not test_only
    if name == "norm_batch":
        return norm == "mabn" if test_only else True
    if name == "gn_groups":
        return norm == "gn"
    if name == "data_seed" or name.startswith("synthetic_"):
        return flags.get("dataset") == "synthetic"
    return True


def _value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _flag(name: str, value: Any) -> str:
    return f"--{name} {_value(value)}"


@dataclass
class FlagChanges:
    applied: List[str] = field(default_factory=list)  # names of flags whose new value is applied
    lines: List[str] = field(default_factory=list)  # one log line per difference


def compare_flags(checkpoint: Mapping[str, Any], path: str, flags: Mapping[str, Any], world_size: int,
                  test_only: bool) -> FlagChanges:
    """Compare this run's ``flags`` with those stored in ``checkpoint``; raise a one-line
    :class:`UserError` naming every refused change, else return what changed."""
    changes = FlagChanges()
    saved = checkpoint.get("args")
    if not isinstance(saved, Mapping):
        changes.lines.append(f"checkpoint {path} stores no flags: they cannot be compared with this run's")
        saved = {}
    refused = []
    for name in sorted((set(saved) | set(flags)) - _NOT_COMPARED):
        if name not in saved or name not in flags:
            if name in flags and saved:
                changes.lines.append(f"{_flag(name, flags[name])}: not stored in the checkpoint (not checked)")
            continue
        old, new = saved[name], flags[name]
        if old == new:
            continue
        refused_here = MODEL_FLAGS if test_only else REFUSED_FLAGS
        mid_epoch = name == "iters_per_epoch" and not test_only and bool(checkpoint.get("step_in_epoch"))
        if name in refused_here or mid_epoch:
            if _relevant(name, flags, test_only):
                refused.append(f"{_flag(name, old)} (now {_value(new)})")
                continue
            note = "no effect with these flags"
        elif name in APPLIED_FLAGS:
            note = "applied"
            changes.applied.append(name)
        elif name in REFUSED_FLAGS:
            note = "no effect on --test_only"
        else:
            note = "not checked"
        changes.lines.append(f"changed since the checkpoint: {_flag(name, old)} -> {_value(new)} ({note})")
    saved_world = checkpoint.get("world_size")
    if not test_only and saved_world is not None and saved_world != world_size:
        refused.append(f"world size {saved_world} (now {world_size})")
    if refused:
        raise UserError(f"checkpoint {path} was trained with other values of flags that change the model or break "
                        f"the exact resume: {', '.join(refused)}; resume with the checkpoint's values, or start a new "
                        f"run without --checkpoint_dir")
    return changes


def apply_optimizer_flags(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, flags: Mapping[str, Any],
                          changed: List[str], epoch: int) -> None:
    """Write the changed momentum and weight decay into the restored optimizer, and put the
    schedule (built from this run's flags) at ``epoch``: the rate is ``learning_rate * 0.1 **
    (milestones passed)``, whatever the checkpoint's rate was."""
    if "momentum" in changed or "weight_decay" in changed:
        for group in optimizer.param_groups:
            group["momentum"] = flags["momentum"]
            group["weight_decay"] = flags["weight_decay"]
    position_scheduler(scheduler, epoch, [flags["learning_rate"]] * len(optimizer.param_groups))


def restore_training_state(checkpoint: Mapping[str, Any], path: str, optimizer: torch.optim.Optimizer,
                           precision: Precision, iters_per_epoch: int) -> TrainState:
    """Optimizer, scaler, position and meter from ``checkpoint`` (the published keys
    suffice); a field that does not fit is a one-line :class:`UserError`."""
    field_name = "optimizer"
    try:
        if "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        field_name = "scaler"
        if precision.scaler is not None and checkpoint.get("scaler"):
            precision.scaler.load_state_dict(checkpoint["scaler"])
        field_name = "meter"
        state = TrainState(epoch=int(checkpoint.get("epoch", checkpoint.get("iteration", 0))),
                           step_in_epoch=int(checkpoint.get("step_in_epoch", 0)), meter=Meter())
        state.meter.load_state_dict(checkpoint.get("meter", {}))
    except MALFORMED_ERRORS as exc:
        raise UserError(f"checkpoint {path}: the {field_name} state does not fit this run ({describe_error(exc)})") from None
    state.global_step = int(checkpoint.get("global_step", state.epoch * iters_per_epoch + state.step_in_epoch))
    return state
