"""``MODEL.WEIGHT``: load a local weight file into a detector and report what was loaded.

Four formats, recognized by their keys (``module.`` prefixes stripped):

(a) a checkpoint of our ``cls`` trainer: ``{"model": ResNet state dict, ...}``;
(b) the published cls state dict (R50-wc.pth): ResNet keys with the published MABN buffers
    ``running_var`` (C,) or (1, C, 1, 1), ``sta_matrix``, ``pre_x2``, ``pre_gz``, ``iters``
    (``mabn.MABN2d`` rewrites them into its own buffers while loading);
(c) a torchvision ResNet state dict;
(d) a detection checkpoint ``{"model", "optimizer", "scheduler", "iteration"}``.

ResNet keys (a-c) go to ``backbone.body.``; ``fc.*`` is skipped. A BN-trained ResNet loaded into
an MABN body gets MABN's statistic, the second moment ``running_var + running_mean ** 2``, and
mean 0 (what ``mabn.convert_norm`` does), and its BN step counter is dropped so MABN's own
warm-up runs. Tensors whose shape does not fit the model (another NUM_CLASSES) are skipped and
reported. Files are read with ``torch.load(weights_only=True)``; nothing is ever downloaded.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from mabn.moving_average_bn import _MovingAverageBatchNorm
from mabn.utils.errors import UserError

__all__ = ["WeightReport", "load_weights", "read_weights"]

BODY_PREFIX = "backbone.body."
DETECTION_PREFIXES = ("backbone.", "rpn.", "roi_heads.", "transform.")
PUBLISHED_MABN_KEYS = ("sta_matrix", "pre_x2", "pre_gz", "iters")


@dataclass
class WeightReport:
    """What :func:`load_weights` did: the source format and the model keys loaded, missing (left
    at their initialization), and the file's keys not used (unexpected or of another shape)."""

    path: str
    source_format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)

    def summary(self) -> str:
        def listing(keys: List[str]) -> str:
            return "" if not keys else " (" + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") + ")"
        return (f"loaded {self.path} ({self.source_format}): {len(self.loaded)} tensors loaded, "
                f"{len(self.missing)} missing{listing(self.missing)}, {len(self.unexpected)} unexpected"
                f"{listing(self.unexpected)}, {len(self.mismatched)} of another shape{listing(self.mismatched)}")


def read_weights(path: str) -> Dict[str, Any]:
    """The file's contents (``weights_only=True``), with a one-line error for what cannot be read."""
    if "://" in path:
        raise UserError(f"MODEL.WEIGHT {path!r}: only local files are loaded (no catalog or download); "
                        f"download the weights yourself and pass the local path")
    if not os.path.isfile(path):
        raise UserError(f"MODEL.WEIGHT {path}: no such file; pass a local weight file (or '' for none)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and zip errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"MODEL.WEIGHT {path}: not a torch file loadable with weights_only=True ({first}); "
                        f"Caffe2 .pkl files are not supported: convert them to a torch state dict") from None
    if not isinstance(data, Mapping):
        raise UserError(f"MODEL.WEIGHT {path}: expected a state dict or a checkpoint dict, got {type(data).__name__}")
    return dict(data)


def _state_dict(data: Mapping[str, Any], path: str) -> Tuple[str, "OrderedDict[str, torch.Tensor]"]:
    """(container, tensors without ``module.``): container is "model", "state_dict" or "bare"."""
    for container in ("model", "state_dict"):
        if isinstance(data.get(container), Mapping):
            tensors = data[container]
            break
    else:
        container, tensors = "bare", data
    state = OrderedDict()
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            state[key[len("module."):] if key.startswith("module.") else key] = value
    if not state:
        raise UserError(f"MODEL.WEIGHT {path}: no tensors found (top-level keys: {', '.join(map(str, list(data)[:8]))})")
    return container, state


def _classify(container: str, state: Mapping[str, torch.Tensor], path: str) -> str:
    if any(key.startswith(DETECTION_PREFIXES) for key in state):
        return "detection checkpoint"
    if "conv1.weight" not in state or not any(key.startswith("layer1.") for key in state):
        raise UserError(f"MODEL.WEIGHT {path}: neither a detection checkpoint nor a ResNet state dict "
                        f"(first keys: {', '.join(list(state)[:4])})")
    if any(key.rsplit(".", 1)[-1] in PUBLISHED_MABN_KEYS for key in state):
        return "published MABN cls state dict"
    if container == "model":
        return "cls checkpoint"
    return "ResNet state dict"


def _bn_to_mabn(state: "OrderedDict[str, torch.Tensor]", model: nn.Module) -> None:
    """BN statistics (mean, variance, step counter) into MABN ones (mean 0, second moment)."""
    for name, module in model.named_modules():
        if not isinstance(module, _MovingAverageBatchNorm):
            continue
        prefix = name + "."
        mean, var = state.get(prefix + "running_mean"), state.get(prefix + "running_var")
        if mean is None or var is None or prefix + "buffer_x2" in state or prefix + "iters" in state:
            continue
        state[prefix + "running_var"] = var.reshape(-1) + mean.reshape(-1).square()
        state[prefix + "running_mean"] = torch.zeros_like(mean.reshape(-1))
        state.pop(prefix + "num_batches_tracked", None)


def _fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    return value.shape == target.shape or value.squeeze().shape == target.squeeze().shape


def load_weights(model: nn.Module, path: str) -> WeightReport:
    """Load ``path`` (formats a-d above) into ``model``; returns a :class:`WeightReport`."""
    container, state = _state_dict(read_weights(path), path)
    source_format = _classify(container, state, path)
    unused: List[str] = []
    if source_format != "detection checkpoint":
        unused = [key for key in state if key.startswith("fc.")]
        state = OrderedDict((BODY_PREFIX + key, value) for key, value in state.items() if not key.startswith("fc."))
        _bn_to_mabn(state, model)
    own = model.state_dict()
    mismatched = [key for key, value in state.items() if key in own and not _fits(value, own[key])]
    for key in mismatched:
        state.pop(key)
    for key, value in state.items():
        if key in own and value.shape != own[key].shape and value.numel() == own[key].numel():
            state[key] = value.reshape(own[key].shape)
    provided = set(state)
    # MABN derives its counters and windows from the published keys while loading.
    upgraded = {key.rsplit(".", 1)[0] for key in state if key.endswith(".iters")}
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys)
    loaded = [key for key in own if key not in missing and (key in provided or key.rsplit(".", 1)[0] in upgraded)]
    report = WeightReport(path, source_format, loaded=loaded, missing=[key for key in own if key not in set(loaded)],
                          unexpected=unused + list(result.unexpected_keys), mismatched=mismatched)
    return report
