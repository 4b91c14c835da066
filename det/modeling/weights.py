"""``MODEL.WEIGHT``: load a local weight file into a detector and report what was loaded.

Five formats. Four are torch files, recognized by their keys (``module.`` prefixes stripped):

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
reported. Torch files are read with ``torch.load(weights_only=True)``.

(e) a Detectron (Caffe2) pickle: a file whose name ends in ``.pkl`` and that is not a torch file,
    holding ``{"blobs": {name: ndarray}}`` or the blobs dict itself (Python 2 pickles included).
    It is read by :class:`DetectronUnpickler`, which builds numpy arrays and plain containers and
    refuses every other global before anything is called. Caffe2 ResNet names are mapped to the
    body as maskrcnn-benchmark's C2 loader maps them (:func:`detectron_body_key`); see
    :func:`load_weights` for the norms.

``catalog://ImageNetPretrained/...`` names (:data:`CATALOG`) are files in a local folder:
``$MABN_WEIGHTS_DIR``, else ``weights/`` in ``$MABN_CACHE`` or ``~/.cache/mabn``. Nothing is ever
downloaded.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Mapping, Optional, Set, Tuple

import numpy
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.convert import is_mabn, mabn_running_var
from mabn.utils.checkpoint import describe_error
from mabn.utils.data import default_cache_dir
from mabn.utils.errors import UserError

__all__ = ["CATALOG", "CatalogEntry", "DetectronUnpickler", "WEIGHTS_DIR_ENV", "WeightReport", "detectron_body_key",
           "load_weights", "read_detectron_pickle", "read_weights", "resolve_weight_path", "weights_dir"]

BODY_PREFIX = "backbone.body."
DETECTION_PREFIXES = ("backbone.", "rpn.", "roi_heads.", "transform.")
PUBLISHED_MABN_KEYS = ("sta_matrix", "pre_x2", "pre_gz", "iters")

WEIGHTS_DIR_ENV = "MABN_WEIGHTS_DIR"
CATALOG_SCHEME = "catalog://"
DETECTRON_URL = "https://dl.fbaipublicfiles.com/detectron"
ZIP_MAGIC = b"PK\x03\x04"
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
"""Start of a torch file of the pre-zip format: the pickled protocol number 0x1950a86a20f9469cfc6c."""


@dataclass(frozen=True)
class CatalogEntry:
    """A published Detectron ImageNet model: its file name in :func:`weights_dir`, the address it
    was published at, and whether its bottlenecks have the stride in the first 1x1 conv."""

    file_name: str
    url: str
    stride_in_1x1: bool


CATALOG: Dict[str, CatalogEntry] = {
    "ImageNetPretrained/MSRA/R-50": CatalogEntry(
        "R-50.pkl", f"{DETECTRON_URL}/ImageNetPretrained/MSRA/R-50.pkl", True),
    "ImageNetPretrained/MSRA/R-50-GN": CatalogEntry(
        "R-50-GN.pkl", f"{DETECTRON_URL}/ImageNetPretrained/47261647/R-50-GN.pkl", False),
    "ImageNetPretrained/MSRA/R-101": CatalogEntry(
        "R-101.pkl", f"{DETECTRON_URL}/ImageNetPretrained/MSRA/R-101.pkl", True),
    "ImageNetPretrained/MSRA/R-101-GN": CatalogEntry(
        "R-101-GN.pkl", f"{DETECTRON_URL}/ImageNetPretrained/47592356/R-101-GN.pkl", False),
    "ImageNetPretrained/FAIR/20171220/X-101-32x8d": CatalogEntry(
        "X-101-32x8d.pkl", f"{DETECTRON_URL}/ImageNetPretrained/20171220/X-101-32x8d.pkl", False),
}
"""maskrcnn-benchmark's ``ModelCatalog`` ImageNet names (after ``catalog://``); each file is named
as the last part of its published address."""


@dataclass
class WeightReport:
    """What :func:`load_weights` did: the source format and the model keys loaded, missing (left
    at their initialization), and the file's keys not used (unexpected or of another shape).
    ``notes`` are caveats (stride layout, norm kinds); ``renamed`` maps each Detectron blob
    loaded to its model key."""

    path: str
    source_format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    renamed: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        def listing(keys: List[str]) -> str:
            return "" if not keys else " (" + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") + ")"
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"loaded {self.path} ({self.source_format}): {len(self.loaded)} tensors loaded, "
                f"{len(self.missing)} missing{listing(self.missing)}, {len(self.unexpected)} unexpected"
                f"{listing(self.unexpected)}, {len(self.mismatched)} of another shape{listing(self.mismatched)}"
                f"{notes}")


def weights_dir() -> Path:
    """The folder of ``catalog://`` files: ``$MABN_WEIGHTS_DIR``, else ``weights`` in
    ``$MABN_CACHE`` (default ``~/.cache/mabn/weights``)."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env).expanduser() if env else default_cache_dir() / "weights"


def _resolve(path: str, what: str = "MODEL.WEIGHT") -> Tuple[str, Optional[CatalogEntry]]:
    """The local file of ``path`` and its catalog entry (None for a plain path); errors name ``what``."""
    if path.startswith(CATALOG_SCHEME):
        name = path[len(CATALOG_SCHEME):]
        entry = CATALOG.get(name)
        if entry is None:
            raise UserError(f"{what} {path!r} is not in the weight catalog; known: "
                            f"{', '.join(CATALOG_SCHEME + known for known in CATALOG)} (or pass a local file)")
        local = weights_dir() / entry.file_name
        if not local.is_file():
            raise UserError(f"{what} {path}: expected the file {local} (the folder is ${WEIGHTS_DIR_ENV}, "
                            f"else weights/ in $MABN_CACHE or ~/.cache/mabn); nothing is downloaded: fetch "
                            f"{entry.url} yourself and put it there")
        return str(local), entry
    if "://" in path:
        raise UserError(f"{what} {path!r}: only local files and catalog:// names are loaded (nothing is "
                        f"downloaded); download the weights yourself and pass the local path")
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file; pass a local weight file (or '' for none)")
    return path, None


def resolve_weight_path(path: str, what: str = "MODEL.WEIGHT") -> str:
    """The local file that ``path`` names (a path or a ``catalog://`` name), with a one-line error
    naming ``what`` (the option) for URLs, unknown catalog names and missing files."""
    return _resolve(path, what)[0]


def _read_torch(path: str) -> Dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and zip errors come in many types
        raise UserError(f"MODEL.WEIGHT {path}: not a torch file loadable with weights_only=True ({describe_error(exc)}); "
                        f"a Detectron (Caffe2) pickle is read only from a file named *.pkl") from None
    if not isinstance(data, Mapping):
        raise UserError(f"MODEL.WEIGHT {path}: expected a state dict or a checkpoint dict, got {type(data).__name__}")
    return dict(data)


def read_weights(path: str) -> Dict[str, Any]:
    """The contents of the torch file ``path`` (``weights_only=True``), with a one-line error for
    what cannot be read."""
    return _read_torch(resolve_weight_path(path))


def _is_detectron_file(path: str) -> bool:
    """A ``.pkl`` file that is neither a torch zip file nor a pre-zip torch file."""
    if not path.lower().endswith(".pkl"):
        return False
    with open(path, "rb") as handle:
        head = handle.read(len(TORCH_LEGACY_MAGIC))
    return not (head.startswith(ZIP_MAGIC) or head == TORCH_LEGACY_MAGIC)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles call it for a bytes value (latin-1 only)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not a pickled bytes value")
    return text.encode("latin-1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object, for what pickles of numpy arrays and plain containers reference,
    by the numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names alike."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # a numpy 1 without the numpy._core aliases
        from numpy.core import multiarray, numeric
    allowed: Dict[Tuple[str, str], Any] = {
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): numpy.dtype,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    for module in ("builtins", "__builtin__"):
        allowed[(module, "set")] = set
        allowed[(module, "frozenset")] = frozenset
    return allowed


def _printable(text: str, limit: int = 80) -> str:
    shown = text if text.isprintable() else ascii(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


class DetectronUnpickler(pickle.Unpickler):
    """Reads a Detectron pickle: numpy arrays and scalars, dicts, lists, tuples, sets, strings and
    numbers. Any other global is refused with a :class:`UserError` before it is called; Python 2
    strings are decoded as latin-1 (numpy turns them back into array bytes)."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UserError(f"MODEL.WEIGHT {self.source}: refused to unpickle {_printable(f'{module}.{name}')}: a "
                            f"Detectron .pkl holds only numpy arrays and other objects can run code while loading; "
                            f"if you trust the file, convert it to a torch state dict of tensors and pass that")
        return found


def read_detectron_pickle(path: str) -> Dict[Any, Any]:
    """The blobs of the Detectron pickle ``path`` (``data["blobs"]`` or ``data`` itself), read by
    :class:`DetectronUnpickler`; one-line errors."""
    try:
        with open(path, "rb") as handle:
            data = DetectronUnpickler(handle, path).load()
    except UserError:
        raise
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise UserError(f"MODEL.WEIGHT {path}: not a readable Detectron pickle ({describe_error(exc)}); pass a "
                        f"Detectron .pkl of numpy arrays or a torch weight file") from None
    blobs = data.get("blobs", data) if isinstance(data, Mapping) else data
    if not isinstance(blobs, Mapping):
        raise UserError(f"MODEL.WEIGHT {path}: expected Detectron's {{'blobs': {{name: array}}}} or a dict of arrays, "
                        f"got {type(blobs).__name__}")
    return dict(blobs)


_C2_PARAMS = {"s": "weight", "gamma": "weight", "b": "bias", "beta": "bias",
              "running_mean": "running_mean", "running_var": "running_var"}
_C2_NORM = re.compile(r"(bn|gn)_(s|b|gamma|beta|running_mean|running_var)")
_C2_BLOCK = re.compile(r"res([2-5])_(\d+)_branch(2a|2b|2c|1)_(.+)")
_C2_BRANCHES = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
                "1": ("downsample.0", "downsample.1")}


def _c2_norm(module: str, rest: str) -> Optional[Tuple[str, str]]:
    match = _C2_NORM.fullmatch(rest)
    if match is None:
        return None
    family, param = match.groups()
    if family == "gn":
        return (f"{module}.{_C2_PARAMS[param]}", "gn") if param in ("s", "b") else None
    return f"{module}.{_C2_PARAMS[param]}", "affine" if param in ("s", "b") else "bn"


def _c2_layer(conv: str, norm: str, rest: str) -> Optional[Tuple[str, str]]:
    if rest in ("w", "b"):
        return f"{conv}.{'weight' if rest == 'w' else 'bias'}", "conv"
    return _c2_norm(norm, rest)


def detectron_body_key(name: str) -> Optional[Tuple[str, str]]:
    """(body key without ``backbone.body.``, kind) of the Caffe2 blob ``name``, None for blobs
    that are not part of a ResNet body (``fc1000_*``, ``pred_*``, ``*_momentum``, FPN and heads).

    kind: "conv" (``_w``, ``_b``), "affine" (Detectron's affine-channel BN, ``_bn_s``/``_bn_b``),
    "bn" (BN with statistics, ``_bn_gamma/_beta/_running_mean/_running_var``), "gn" (``_gn_s``/
    ``_gn_b``). The stem is ``conv1_w`` with ``res_conv1_bn_*`` or ``conv1_gn_*``; block ``i``
    of stage ``res{k}`` is ``layer{k-1}.{i}``, ``branch2{a,b,c}`` its ``conv{1,2,3}`` and
    ``bn{1,2,3}``, ``branch1`` its ``downsample.0`` and ``downsample.1``.
    """
    if name.startswith("res_conv1_"):
        return _c2_norm("bn1", name[len("res_conv1_"):])
    if name.startswith("conv1_"):
        return _c2_layer("conv1", "bn1", name[len("conv1_"):])
    match = _C2_BLOCK.fullmatch(name)
    if match is None:
        return None
    stage, index, branch, rest = match.groups()
    conv, norm = _C2_BRANCHES[branch]
    prefix = f"layer{int(stage) - 1}.{int(index)}."
    return _c2_layer(prefix + conv, prefix + norm, rest)


def _numeric_array(value: Any) -> bool:
    return isinstance(value, numpy.ndarray) and value.dtype.kind in "biuf"


def _to_tensor(value: Any) -> torch.Tensor:
    """A writable, native-byte-order copy of the array ``value``."""
    return torch.from_numpy(numpy.array(value, dtype=value.dtype.newbyteorder("="), copy=True))


def _norm_modules(model: nn.Module, prefixes: Set[str]) -> Dict[str, nn.Module]:
    return {name + ".": module for name, module in model.named_modules() if name + "." in prefixes}


def _affine_into_frozen_bn(state: "OrderedDict[str, torch.Tensor]", targets: Dict[str, nn.Module]) -> None:
    """Statistics for FrozenBN layers that got Detectron's affine-channel scale and bias: mean 0
    and variance ``1 - eps``, so that ``weight * rsqrt(running_var + eps)`` is ``weight``."""
    for prefix, module in targets.items():
        if not isinstance(module, FrozenBatchNorm2d) or prefix + "running_var" in state:
            continue
        reference = state.get(prefix + "weight", state.get(prefix + "bias"))
        if reference is None:
            continue
        state[prefix + "running_mean"] = torch.zeros(reference.numel())
        state[prefix + "running_var"] = torch.full((reference.numel(),), 1.0 - module.eps)


def _norm_notes(kinds: Dict[str, str], targets: Dict[str, nn.Module]) -> List[str]:
    """Caveats on how the file's norm blobs met the body's norm layers."""
    notes = []
    into_trainable = sorted({type(module).__name__ for prefix, module in targets.items()
                             if kinds[prefix] == "affine" and isinstance(module, nn.modules.batchnorm._BatchNorm)})
    if into_trainable:
        notes.append(f"the file's affine BN (scale, bias) went into {', '.join(into_trainable)} layers, whose running "
                     f"statistics keep their initialization")
    crossed = sorted({f"{'GN' if kinds[prefix] == 'gn' else 'BN'} into {type(module).__name__}"
                      for prefix, module in targets.items()
                      if (kinds[prefix] == "gn") != isinstance(module, nn.GroupNorm)})
    if crossed:
        notes.append(f"norm kinds differ ({', '.join(crossed)}): only scale and bias were loaded, by name")
    return notes


def _stride_note(model: nn.Module, entry: Optional[CatalogEntry], name: str) -> List[str]:
    block = dict(model.named_modules()).get(BODY_PREFIX + "layer2.0")
    if entry is None or not isinstance(block, Bottleneck):
        return []
    in_1x1 = tuple(block.conv1.stride) != (1, 1)
    if in_1x1 == entry.stride_in_1x1:
        return []
    where = {True: "1x1", False: "3x3"}
    return [f"{name} has the stride in the {where[entry.stride_in_1x1]} conv but the body in the {where[in_1x1]}: "
            f"set MODEL.RESNETS.STRIDE_IN_1X1 {entry.stride_in_1x1}"]


def _load_detectron(model: nn.Module, path: str, name: str, entry: Optional[CatalogEntry]) -> WeightReport:
    """Detectron blobs into the body (see :func:`load_weights`)."""
    blobs = read_detectron_pickle(path)
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    renamed: Dict[str, str] = {}
    kinds: Dict[str, str] = {}
    unused: List[str] = []
    for blob in sorted(blobs, key=str):
        target = detectron_body_key(blob) if isinstance(blob, str) and not blob.endswith("_momentum") else None
        if target is None or not _numeric_array(blobs[blob]):
            unused.append(str(blob))
            continue
        key, kind = BODY_PREFIX + target[0], target[1]
        if key in state:  # a second blob for one parameter (_bn_gamma and _bn_s): the first in sorted order loads
            unused.append(blob)
            continue
        state[key] = _to_tensor(blobs[blob])
        renamed[blob] = key
        if kind != "conv":
            kinds[key.rsplit(".", 1)[0] + "."] = kind
    if BODY_PREFIX + "conv1.weight" not in state or not any(key.startswith(BODY_PREFIX + "layer1.") for key in state):
        names = ", ".join(_printable(str(blob), 40) for blob in list(blobs)[:4]) or "none"
        raise UserError(f"MODEL.WEIGHT {path}: not a Detectron ResNet pickle (no conv1_w and res2_* blobs; first "
                        f"names: {names})")
    targets = _norm_modules(model, set(kinds))
    _affine_into_frozen_bn(state, {prefix: module for prefix, module in targets.items() if kinds[prefix] == "affine"})
    _bn_to_mabn(state, model)
    loaded, missing, extra, mismatched = _load_state(model, state)
    blob_of = {key: blob for blob, key in renamed.items()}
    present = sorted(set(kinds.values()) - {"conv"})
    described = {"affine": "affine BN", "bn": "BN with statistics", "gn": "GN"}
    source_format = "Detectron pickle" + (", " + " + ".join(described[kind] for kind in present) if present else "")
    return WeightReport(path, source_format, loaded=loaded, missing=missing,
                        unexpected=unused + [blob_of.get(key, key) for key in extra],
                        mismatched=[blob_of.get(key, key) for key in mismatched],
                        notes=_stride_note(model, entry, name) + _norm_notes(kinds, targets),
                        renamed={blob: key for blob, key in renamed.items() if key in set(loaded)})


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
        if not is_mabn(module):
            continue
        prefix = name + "."
        mean, var = state.get(prefix + "running_mean"), state.get(prefix + "running_var")
        if mean is None or var is None or prefix + "buffer_x2" in state or prefix + "iters" in state:
            continue
        state[prefix + "running_var"] = mabn_running_var(mean, var)
        state[prefix + "running_mean"] = torch.zeros_like(mean.reshape(-1))
        state.pop(prefix + "num_batches_tracked", None)


def _fits(value: torch.Tensor, target: torch.Tensor) -> bool:
    return value.shape == target.shape or value.squeeze().shape == target.squeeze().shape


def _load_state(model: nn.Module, state: "OrderedDict[str, torch.Tensor]"
                ) -> Tuple[List[str], List[str], List[str], List[str]]:
    """Load ``state`` (model keys) into ``model``, skipping tensors of another shape; returns the
    model keys loaded and missing, and the state keys unexpected and of another shape."""
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
    loaded_set = set(loaded)
    return loaded, [key for key in own if key not in loaded_set], list(result.unexpected_keys), mismatched


def load_weights(model: nn.Module, path: str) -> WeightReport:
    """Load ``path`` (a file or a ``catalog://`` name; formats a-e above) into ``model``; returns
    a :class:`WeightReport`, whose ``summary()`` is the line to log.

    A Detectron pickle fills ``backbone.body.`` only. Its affine-channel BN (scale ``s``, bias
    ``b``) becomes, in a FrozenBN layer, weight ``s``, bias ``b``, running mean 0 and running
    variance ``1 - eps``: torchvision's FrozenBN computes ``weight * rsqrt(running_var + eps)``,
    so the layer is exactly ``s * x + b`` (these derived statistics count as loaded). In a
    trainable norm (BN, SyncBN, BRN, MABN) only weight and bias are loaded; its running
    statistics keep their initialization and are reported missing. BN blobs with statistics
    (``_bn_gamma/_beta/_running_mean/_running_var``) load as they are, turned into MABN's second
    moment for an MABN body; ``_gn_s/_gn_b`` are GroupNorm weight and bias. Classifier blobs,
    ``*_momentum`` and blobs outside the body are reported unexpected by their Caffe2 names.
    """
    local, entry = _resolve(path)
    if _is_detectron_file(local):
        return _load_detectron(model, local, path, entry)
    container, state = _state_dict(_read_torch(local), local)
    source_format = _classify(container, state, local)
    unused: List[str] = []
    if source_format != "detection checkpoint":
        unused = [key for key in state if key.startswith("fc.")]
        state = OrderedDict((BODY_PREFIX + key, value) for key, value in state.items() if not key.startswith("fc."))
        _bn_to_mabn(state, model)
    loaded, missing, unexpected, mismatched = _load_state(model, state)
    return WeightReport(local, source_format, loaded=loaded, missing=missing, unexpected=unused + unexpected,
                        mismatched=mismatched)
