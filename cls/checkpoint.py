"""Checkpoints: atomic writes, per-rank state, published-format loading.

``checkpoint.pth`` holds the published keys (``model`` without the ``module.`` prefix,
``optimizer``, ``scheduler``, ``iteration`` = completed epochs) and what an exact resume needs:
``epoch`` and ``step_in_epoch`` (the position, also inside an epoch after SIGTERM), the running
sums of the interrupted epoch (``meter``), the AMP scaler, ``args`` and, for every rank, its own
buffers (BN/MABN statistics differ per rank: DDP runs with ``broadcast_buffers=False``) and RNG
states (``rank_states``). A file with only the published keys loads too (training continues at
the next epoch; data order and buffers then cannot be exact).

Writes go to a temporary file in the same directory, are flushed to disk and renamed over the
target (``os.replace``), so a crash never leaves a truncated checkpoint.
"""
from __future__ import annotations

import os
import random
import tempfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from mabn.utils.errors import UserError

__all__ = ["CHECKPOINT_NAME", "save_atomic", "resolve_checkpoint_path", "read_checkpoint", "strip_module_prefix",
           "load_model_state", "rank_buffers", "load_rank_buffers", "capture_rng", "restore_rng"]

CHECKPOINT_NAME = "checkpoint.pth"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_checkpoint_path(path: str) -> str:
    """``path`` itself, or ``path/checkpoint.pth`` for a directory; :class:`UserError` if missing."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint_dir {path}: no such checkpoint file")
    return path


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU. A bare state dict is accepted as ``{"model": state_dict}``."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise UserError(f"--checkpoint_dir {path}: not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(data, Mapping) and "model" in data:
        return dict(data)
    if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"model": data}
    raise UserError(f"--checkpoint_dir {path}: no 'model' entry (keys: {', '.join(map(str, data)) if isinstance(data, Mapping) else type(data).__name__})")


def strip_module_prefix(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Drop the ``module.`` prefix that DistributedDataParallel adds to every key."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def _listing(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Load strictly; a mismatch is a :class:`UserError` listing missing/unexpected/mis-shaped keys.

    Layers may rewrite keys while loading (MABN upgrades the published buffers), so the key lists
    are computed only to explain a load that failed.
    """
    state_dict = strip_module_prefix(state_dict)
    failure = None
    try:
        result = model.load_state_dict(state_dict, strict=False)
        if not result.missing_keys and not result.unexpected_keys:
            return
    except (RuntimeError, ValueError) as exc:
        failure = str(exc).strip().splitlines()[0]
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}" for k in state_dict
                  if k in own and hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches (checkpoint vs model): {_listing(mismatched, 3)}")
    if not parts:
        parts.append(failure or "unknown mismatch")
    raise UserError(f"checkpoint {source} does not fit this model (another --arch, --norm or --num_classes?): "
                    + "; ".join(parts))


def rank_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's buffers (normalization statistics and MABN windows), on the CPU."""
    return {name: buffer.detach().cpu().clone() for name, buffer in model.named_buffers()}


@torch.no_grad()
def load_rank_buffers(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    own = dict(model.named_buffers())
    for name, value in buffers.items():
        if name in own and own[name].shape == value.shape:
            own[name].copy_(value)


def capture_rng(device: torch.device) -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
