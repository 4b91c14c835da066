"""Checkpoints that are safe to write and safe to read.

* :func:`save_checkpoint` refuses NaN/Inf: every floating tensor (and float) of the object is
  checked first, and the first offending one is named in a :class:`NonFiniteStateError`; the
  previous file stays untouched.
* Writes are atomic (:func:`save_atomic`): a temporary file in the same directory, flushed to
  disk and renamed over the target, so a crash never leaves a truncated checkpoint.
* :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, so a file cannot run code;
  ``trusted=True`` is the opt-in for legacy pickles from a trusted source. Everything a trainer
  stores (RNG states included, see :func:`capture_rng_state`) is tensors and builtins.
* :func:`check_fields` turns a hand-edited file with fields of the wrong type into one line.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from collections import OrderedDict
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from mabn.utils.errors import NonFiniteStateError, UserError

if TYPE_CHECKING:
    from mabn.utils.distributed import DistEnv

__all__ = ["CHECKPOINT_NAME", "MALFORMED_ERRORS", "save_atomic", "write_text_atomic", "save_checkpoint", "check_finite",
           "first_non_finite", "kept_message", "resolve_checkpoint_path", "load_checkpoint", "check_fields",
           "strip_module_prefix", "describe_error", "load_model_state", "rank_buffers", "load_rank_buffers",
           "capture_rng_state", "restore_rng_state", "restore_rank_state", "save_run_checkpoint", "seed_all"]

CHECKPOINT_NAME = "checkpoint.pth"
# What loading a hand-edited or foreign state into torch objects raises.
MALFORMED_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)
# Lines of torch.load's weights-only errors that say nothing about the file itself.
_TORCH_LOAD_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _replace_atomically(path: str, write: Callable[[IO], None], mode: str) -> None:
    """``write(stream)`` into a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: a crash never leaves half a file, and a failed write leaves nothing behind."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, mode, encoding=None if "b" in mode else "utf-8") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace``."""
    _replace_atomically(path, lambda stream: torch.save(obj, stream), "wb")


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
    _replace_atomically(path, lambda stream: stream.write(text), "w")


def _leaves(obj: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}/{key}" if path else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{path}/{index}")
    else:
        yield path, obj


def first_non_finite(obj: Any) -> Optional[str]:
    """The path (``model/layer1.0.bn1.running_var``) of the first floating tensor or float in the
    nested dicts/lists ``obj`` that holds NaN or Inf; None when everything is finite."""
    for path, value in _leaves(obj, ""):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() or value.is_complex():
                if not bool(torch.isfinite(value).all()):
                    return path
        elif isinstance(value, float) and not math.isfinite(value):
            return path
    return None


def kept_message(path: str) -> str:
    """What a stopped run leaves behind at ``path``, for its error message."""
    return f"the last good checkpoint {path} was kept" if os.path.exists(path) else "no checkpoint was written"


def check_finite(obj: Any, path: str) -> None:
    """:class:`NonFiniteStateError` naming the first NaN/Inf of ``obj``, meant to be written to
    ``path`` (the message says what stays there)."""
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteStateError(f"non-finite value in {bad}; not saved, {kept_message(path)} "
                                  f"(lower the learning rate?)")


def save_checkpoint(obj: Mapping[str, Any], path: str) -> None:
    """:func:`save_atomic` after :func:`check_finite`: a checkpoint with NaN/Inf is never written
    and the previous one stays."""
    check_finite(obj, path)
    save_atomic(obj, path)


def resolve_checkpoint_path(path: str, flag: str) -> str:
    """``path`` itself, or ``path/checkpoint.pth`` for a directory; :class:`UserError` naming the
    app's ``flag`` if missing."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such checkpoint file")
    return path


def load_checkpoint(path: str, trusted: bool = False, trust_hint: Optional[str] = None) -> Dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` (``trusted``: a full unpickle).

    A bare state dict is returned as ``{"model": state_dict}``. ``trust_hint`` is how the app
    lets a user opt into ``trusted`` (a flag), named when weights-only loading refuses the file.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # pickle/zip errors of many kinds
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        specific = [line for line in lines if not line.startswith(_TORCH_LOAD_BOILERPLATE)] or lines or [""]
        code = next((line for line in specific if "GLOBAL" in line), None)
        if code is not None and not trusted:
            remedy = (f"if the file comes from a source you trust, pass {trust_hint}" if trust_hint else
                      "save its tensors as a state dict (torch.save(model.state_dict(), path)) and load that")
            raise UserError(f"checkpoint {path} holds Python objects that weights-only loading refuses to run "
                            f"({code.rstrip('.')}); {remedy}") from None
        detail = f"{type(exc).__name__}: {specific[0]}" if specific[0] else type(exc).__name__
        raise UserError(f"checkpoint {path}: not a readable checkpoint ({detail})") from None
    if isinstance(data, Mapping) and "model" in data:
        return dict(data)
    if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"model": data}
    keys = ", ".join(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
    raise UserError(f"checkpoint {path}: no 'model' entry (keys: {keys})")


TypeSpec = Union[type, Tuple[type, ...]]


def _type_names(expected: TypeSpec) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("None" if t is type(None) else t.__name__ for t in types)


def check_fields(checkpoint: Mapping[str, Any], fields: Mapping[str, TypeSpec], source: str) -> None:
    """:class:`UserError` naming the first field of ``checkpoint`` (when present) whose type is not
    the expected one, e.g. a hand-edited ``epoch: "3"``. ``bool`` never passes for ``int``."""
    for key, expected in fields.items():
        if key not in checkpoint:
            continue
        value = checkpoint[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise UserError(f"checkpoint {source}: field {key!r} is {type(value).__name__} ({str(value)[:40]!r}), "
                            f"expected {_type_names(expected)}; the file was edited or is not a checkpoint")


def strip_module_prefix(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Drop the ``module.`` prefix that DistributedDataParallel adds to every key."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def _listing(keys: List[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], source: str, hint: str = "") -> None:
    """Load strictly; a mismatch is a :class:`UserError` listing missing/unexpected/mis-shaped keys
    (``hint``, e.g. the flags that decide the model, goes into the message).

    Layers may rewrite keys while loading (MABN upgrades the published buffers), so the key lists
    are computed only to explain a load that failed.
    """
    state_dict = strip_module_prefix(state_dict)
    failure = None
    try:
        result = model.load_state_dict(state_dict, strict=False)
        if not result.missing_keys and not result.unexpected_keys:
            return
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
    raise UserError(f"checkpoint {source} does not fit this model{f' ({hint})' if hint else ''}: " + "; ".join(parts))


def rank_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's buffers (normalization statistics and MABN windows), on the CPU."""
    return {name: buffer.detach().cpu().clone() for name, buffer in model.named_buffers()}


@torch.no_grad()
def load_rank_buffers(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    own = dict(model.named_buffers())
    for name, value in buffers.items():
        if name in own and own[name].shape == value.shape:
            own[name].copy_(value)


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's (when installed) and torch's generators (every device's)."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and builtins, so that a checkpoint
    holding them loads with ``weights_only=True``."""
    import numpy as np

    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Undo :func:`capture_rng_state` (entries that are absent are left alone)."""
    import numpy as np

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
                             "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def restore_rank_state(checkpoint: Optional[Mapping[str, Any]], path: str, network: nn.Module, env: "DistEnv") -> None:
    """This rank's buffers and RNG states, after the data-parallel wrapper (which may broadcast
    rank 0's). Nothing for a checkpoint without them or from another world size (an evaluation
    on another number of processes); a field that does not fit is a one-line :class:`UserError`."""
    rank_states = checkpoint.get("rank_states") if checkpoint is not None else None
    if not rank_states or len(rank_states) != env.world_size:
        return
    try:
        own = rank_states[env.rank]
        load_rank_buffers(network, own["buffers"])
        restore_rng_state(own["rng"], env.device)
    except MALFORMED_ERRORS as exc:
        raise UserError(f"checkpoint {path}: rank_states[{env.rank}] does not fit this run "
                        f"({describe_error(exc)})") from None


def save_run_checkpoint(path: str, network: nn.Module, env: "DistEnv",
                        contents: Callable[[List[Dict[str, Any]]], Dict[str, Any]], kept_path: Optional[str] = None) -> None:
    """A trainer's checkpoint: every rank's buffers and RNG states are gathered into
    ``rank_states``, ``contents(rank_states)`` (the app's fields) is checked for NaN/Inf on every
    rank, so that all of them stop together and nothing is written, and rank 0 writes it to
    ``path`` atomically. ``kept_path`` is the file a refusal says stays (default ``path``)."""
    own = {"buffers": rank_buffers(network), "rng": capture_rng_state(env.device)}
    checkpoint = contents(env.all_gather_object(own))
    check_finite(checkpoint, kept_path or path)
    if env.is_main:
        save_atomic(checkpoint, path)
