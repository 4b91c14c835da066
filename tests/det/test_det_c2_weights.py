"""det.modeling.weights, Detectron (Caffe2) pickles: the restricted unpickler, the Caffe2 names of a
ResNet body, the norms they load into, and catalog:// names. Every .pkl is written here."""
from __future__ import annotations

import _codecs
import builtins
import io
import os
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
import torch
import torchvision
from det_helpers import tiny_config
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from det.modeling import build_detection_model, load_weights
from det.modeling.weights import (CATALOG, DetectronUnpickler, detectron_body_key, read_detectron_pickle,
                                  weights_dir)
from mabn.utils.errors import UserError

BODY = "backbone.body."
# (tiny config, CONV_BODY, suffix of TRANS_FUNC / STEM_FUNC) of an R-50-FPN body per norm.
R50_BODIES = {"frozen": ("bn", "R-50-FPN", "FixedBatchNorm"), "bn": ("bn", "R-50-FPN-BN", "BN"),
              "syncbn": ("syncbn", "R-50-FPN-SYNCBN", "SyncBN"), "mabn": ("mabn", "R-50-FPN-MABN", "MABN"),
              "gn": ("gn", "R-50-FPN-GN", "GN")}
# Caffe2 suffix of each norm parameter, per blob style.
NORM_SUFFIXES = {"affine": {"weight": "bn_s", "bias": "bn_b"},
                 "bn": {"weight": "bn_gamma", "bias": "bn_beta", "running_mean": "bn_running_mean",
                        "running_var": "bn_running_var"},
                 "gn": {"weight": "gn_s", "bias": "gn_b"}}
BRANCHES = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
            "downsample.0": "1", "downsample.1": "1"}


def _r50(body: str = "frozen", *opts: str, stride_in_1x1: bool = True) -> nn.Module:
    config, conv_body, norm = R50_BODIES[body]
    return build_detection_model(tiny_config(
        config, "MODEL.BACKBONE.CONV_BODY", conv_body, "MODEL.RESNETS.TRANS_FUNC", f"BottleneckWith{norm}",
        "MODEL.RESNETS.STEM_FUNC", f"StemWith{norm}", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
        "MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1), *opts))


def _c2_name(key: str, style: str) -> Optional[str]:
    """Detectron's name for the body parameter ``key`` (torchvision layout), None if a Detectron
    file of ``style`` has no such blob."""
    module, _, param = key.rpartition(".")
    if module == "conv1":
        return "conv1_w"
    suffix = NORM_SUFFIXES[style].get(param)
    if module == "bn1":
        return None if suffix is None else ("conv1_" if style == "gn" else "res_conv1_") + suffix
    layer, block, part = module.split(".", 2)
    base = f"res{int(layer[len('layer'):]) + 1}_{block}_branch{BRANCHES[part]}"
    if part.startswith("conv") or part == "downsample.0":
        return base + "_w"
    return None if suffix is None else f"{base}_{suffix}"


def _detectron_blobs(model: nn.Module, style: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 blobs for every body parameter of ``model`` under its Caffe2 name, and a
    classifier ``fc1000``."""
    rng = np.random.default_rng(seed)
    blobs: Dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        name = _c2_name(key[len(BODY):], style) if key.startswith(BODY) else None
        if name is not None:
            array = rng.standard_normal(tuple(value.shape)).astype(np.float32)
            blobs[name] = np.abs(array) + 0.5 if name.endswith("running_var") else array
    blobs["fc1000_w"] = rng.standard_normal((10, 2048)).astype(np.float32)
    blobs["fc1000_b"] = rng.standard_normal(10).astype(np.float32)
    return blobs


class _LegacyPickler(pickle._Pickler):
    """Pickles numpy arrays under the numpy 1 module names (``numpy.core.*``); with ``python2``
    bytes and str become Python 2 strings (BINSTRING), as in Detectron's Python 2 files."""

    def __init__(self, file: io.BytesIO, protocol: int, python2: bool) -> None:
        super().__init__(file, protocol)
        self.dispatch = dict(pickle._Pickler.dispatch)
        if python2:
            self.dispatch[bytes] = _LegacyPickler.save_python2_string
            self.dispatch[str] = _LegacyPickler.save_python2_string

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        module = getattr(obj, "__module__", "")
        if not module.startswith("numpy._core."):
            super().save_global(obj, name)
            return
        module = module.replace("numpy._core.", "numpy.core.")
        qualname = name or obj.__qualname__
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)

    def save_python2_string(self, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)


def _dumps(obj: Any, style: str) -> bytes:
    """``obj`` pickled as numpy 2 writes it ("numpy2-p2/4/5"), as numpy 1 did ("numpy1-p2/4"), or
    as Python 2 with numpy 1 did ("python2-p2")."""
    writer, protocol = style.split("-p")
    if writer == "numpy2":
        return pickle.dumps(obj, protocol=int(protocol))
    buffer = io.BytesIO()
    _LegacyPickler(buffer, int(protocol), python2=writer == "python2").dump(obj)
    return buffer.getvalue()


def _write(path: Path, obj: Any, style: str = "python2-p2") -> str:
    path.write_bytes(_dumps(obj, style))
    return str(path)


class _Reduce:
    """An object whose unpickling calls ``function(*args)``."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _attacks(marker: Path) -> Dict[str, Any]:
    write = f"open({str(marker)!r}, 'w').write('pwned')"
    return {"os.system": _Reduce(os.system, f"touch {marker}"), "exec": _Reduce(builtins.exec, write),
            "eval": _Reduce(builtins.eval, write), "Path.write_text": _Reduce(Path.write_text, marker, "pwned")}


@pytest.mark.parametrize("attack", ["os.system", "exec", "eval", "Path.write_text"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, attack, protocol):
    marker = tmp_path / "pwned"
    evil = _attacks(marker)[attack]
    blobs = {"conv1_w": np.zeros((1, 1), np.float32), "res2_0_branch2a_w": evil}
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=protocol))
    with pytest.raises(UserError, match="refused to unpickle") as info:
        load_weights(_r50(), str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "convert it to a torch state dict" in message
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # control: plain pickle runs the payload
    assert marker.exists()


def test_refusal_names_the_global(tmp_path):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pkl", {"blobs": {"a": _Reduce(os.system, f"touch {marker}")}}, "numpy2-p2")
    with pytest.raises(UserError, match=r"refused to unpickle posix\.system: ") as info:
        read_detectron_pickle(path)
    assert "\n" not in str(info.value) and not marker.exists()
    objects = np.array([_Reduce(os.system, f"touch {marker}")], dtype=object)
    path = _write(tmp_path / "objects.pkl", {"blobs": {"conv1_w": objects}}, "numpy2-p4")
    with pytest.raises(UserError, match=r"posix\.system"):
        read_detectron_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
                                          ("builtins", "__import__"), ("__builtin__", "eval"), ("os", "system"),
                                          ("subprocess", "Popen"), ("numpy", "load"), ("numpy.core.multiarray", "eval"),
                                          ("torch", "load"), ("collections", "namedtuple")])
def test_unpickler_refuses_every_other_global(module, name):
    with pytest.raises(UserError, match=f"refused to unpickle {module}.{name}:"):
        DetectronUnpickler(io.BytesIO(b""), "x.pkl").find_class(module, name)


def test_unpickler_allows_codecs_encode_for_latin1_only(tmp_path):
    path = _write(tmp_path / "codec.pkl", {"blobs": {"conv1_w": _Reduce(_codecs.encode, "abc", "rot13")}}, "numpy2-p2")
    with pytest.raises(UserError, match="not a readable Detectron pickle .*rot13"):
        read_detectron_pickle(path)
    path = _write(tmp_path / "bytes.pkl", {"blobs": {"raw": b"\xff\x00"}}, "numpy2-p2")
    assert read_detectron_pickle(path) == {"raw": b"\xff\x00"}


@pytest.mark.parametrize("style", ["numpy2-p2", "numpy2-p4", "numpy2-p5", "numpy1-p2", "numpy1-p4", "python2-p2"])
def test_numpy_arrays_of_every_writer_load(tmp_path, style):
    rng = np.random.default_rng(3)
    blobs = OrderedDict([("conv1_w", rng.standard_normal((4, 3, 7, 7)).astype(np.float32)),
                         ("res2_0_branch2a_bn_s", rng.standard_normal(4)), ("counts", np.arange(5, dtype=np.int64)),
                         ("big_endian", np.arange(3, dtype=">f4")), ("scale", np.float32(2.5))])
    data = _dumps({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}, style)
    if style.startswith("python2"):
        with pytest.raises(UnicodeDecodeError):  # why Python 2 pickles need encoding="latin1"
            pickle.loads(data)
    (tmp_path / "blobs.pkl").write_bytes(data)
    loaded = read_detectron_pickle(str(tmp_path / "blobs.pkl"))
    assert list(loaded) == list(blobs)
    for name, value in blobs.items():
        native = loaded[name].dtype.newbyteorder("=") == value.dtype.newbyteorder("=")
        assert native and np.array_equal(loaded[name], value), name


def test_blobs_dict_without_the_blobs_key_loads(tmp_path):
    model = _r50()
    blobs = _detectron_blobs(model, "affine")
    report = load_weights(_r50(), _write(tmp_path / "bare.pkl", blobs, "numpy2-p4"))
    assert report.source_format == "Detectron pickle, affine BN" and not report.mismatched


@pytest.mark.parametrize("name, expected", [
    ("conv1_w", ("conv1.weight", "conv")),
    ("res_conv1_bn_s", ("bn1.weight", "affine")),
    ("res_conv1_bn_b", ("bn1.bias", "affine")),
    ("conv1_gn_s", ("bn1.weight", "gn")),
    ("res2_0_branch2a_w", ("layer1.0.conv1.weight", "conv")),
    ("res2_0_branch2a_bn_s", ("layer1.0.bn1.weight", "affine")),
    ("res3_3_branch2b_bn_b", ("layer2.3.bn2.bias", "affine")),
    ("res4_22_branch2c_w", ("layer3.22.conv3.weight", "conv")),
    ("res5_2_branch2c_bn_b", ("layer4.2.bn3.bias", "affine")),
    ("res2_0_branch1_w", ("layer1.0.downsample.0.weight", "conv")),
    ("res3_0_branch1_bn_s", ("layer2.0.downsample.1.weight", "affine")),
    ("res4_0_branch1_gn_b", ("layer3.0.downsample.1.bias", "gn")),
    ("res2_1_branch2b_gn_s", ("layer1.1.bn2.weight", "gn")),
    ("res2_0_branch2a_bn_gamma", ("layer1.0.bn1.weight", "bn")),
    ("res2_0_branch2a_bn_beta", ("layer1.0.bn1.bias", "bn")),
    ("res_conv1_bn_running_mean", ("bn1.running_mean", "bn")),
    ("res5_0_branch1_bn_running_var", ("layer4.0.downsample.1.running_var", "bn")),
    ("fc1000_w", None), ("pred_b", None), ("fpn_inner_res5_2_sum_w", None), ("conv_rpn_fpn2_w", None),
    ("res2_0_branch2a_gn_running_mean", None), ("res6_0_branch2a_w", None), ("res2_0_branch2d_w", None),
])
def test_caffe2_names(name, expected):
    assert detectron_body_key(name) == expected


def _body_norms(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: module for name, module in model.backbone.body.named_modules()
            if isinstance(module, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))}


def _assert_blobs_loaded(model: nn.Module, blobs: Dict[str, np.ndarray], style: str, skip=()) -> None:
    own = model.state_dict()
    for key in own:
        name = _c2_name(key[len(BODY):], style) if key.startswith(BODY) else None
        if name is not None and not key.endswith(skip):
            assert torch.equal(own[key], torch.from_numpy(blobs[name])), (name, key)


def test_detectron_r50_affine_into_frozen_bn_is_exact(tmp_path):
    model = _r50()
    blobs = _detectron_blobs(model, "affine")
    report = load_weights(model, _write(tmp_path / "R-50.pkl", {"blobs": blobs}))
    assert report.source_format == "Detectron pickle, affine BN" and not report.notes
    assert report.unexpected == ["fc1000_b", "fc1000_w"] and not report.mismatched
    body_keys = [key for key in model.state_dict() if key.startswith(BODY)]
    assert not [key for key in report.missing if key.startswith(BODY)] and len(report.loaded) == len(body_keys)
    assert len(report.renamed) == len(blobs) - 2
    assert report.renamed["res2_0_branch2a_w"] == BODY + "layer1.0.conv1.weight"
    assert report.renamed["res_conv1_bn_s"] == BODY + "bn1.weight"
    assert report.renamed["res5_2_branch2c_bn_b"] == BODY + "layer4.2.bn3.bias"
    assert report.renamed["res3_0_branch1_w"] == BODY + "layer2.0.downsample.0.weight"
    _assert_blobs_loaded(model, blobs, "affine")
    x = torch.randn(2, 256, 5, 5)
    for name, norm in _body_norms(model).items():
        assert isinstance(norm, FrozenBatchNorm2d) and not norm.running_mean.any(), name
        assert torch.equal(norm.running_var + norm.eps, torch.ones_like(norm.running_var)), name
    norm = model.backbone.body.layer1[0].bn3
    scale = torch.from_numpy(blobs["res2_0_branch2c_bn_s"]).view(1, -1, 1, 1)
    shift = torch.from_numpy(blobs["res2_0_branch2c_bn_b"]).view(1, -1, 1, 1)
    assert torch.equal(norm(x), x * scale + shift)  # exactly Detectron's affine channel op
    assert "Detectron pickle, affine BN" in report.summary() and "2 unexpected (fc1000_b, fc1000_w)" in report.summary()


def test_detectron_bn_statistics_into_syncbn_and_mabn(tmp_path):
    model = _r50("syncbn")
    blobs = _detectron_blobs(model, "bn")
    path = _write(tmp_path / "R-50-2.pkl", {"blobs": blobs}, "numpy2-p2")
    report = load_weights(model, path)
    assert report.source_format == "Detectron pickle, BN with statistics" and not report.notes
    body_missing = {key.rsplit(".", 1)[1] for key in report.missing if key.startswith(BODY)}
    assert body_missing == {"num_batches_tracked", "skipped_updates"}  # counters, not weights
    _assert_blobs_loaded(model, blobs, "bn")
    mabn_model = _r50("mabn")
    load_weights(mabn_model, path)
    _assert_blobs_loaded(mabn_model, blobs, "bn", skip=("running_mean", "running_var"))
    norm = mabn_model.backbone.body.layer2[0].downsample[1]
    mean, var = (torch.from_numpy(blobs[f"res3_0_branch1_bn_running_{stat}"]) for stat in ("mean", "var"))
    assert torch.equal(norm.running_var, var + mean.square()) and not norm.running_mean.any()


def test_affine_into_trainable_bn_keeps_its_statistics(tmp_path):
    model = _r50("bn")
    blobs = _detectron_blobs(model, "affine")
    report = load_weights(model, _write(tmp_path / "R-50.pkl", {"blobs": blobs}))
    _assert_blobs_loaded(model, blobs, "affine")
    for name, norm in _body_norms(model).items():
        assert not norm.running_mean.any() and torch.equal(norm.running_var, torch.ones_like(norm.running_var)), name
    body_missing = {key.rsplit(".", 1)[1] for key in report.missing if key.startswith(BODY)}
    assert body_missing == {"running_mean", "running_var", "num_batches_tracked"}
    assert any("keep their initialization" in note for note in report.notes)


def test_detectron_gn(tmp_path):
    model = _r50("gn")
    blobs = _detectron_blobs(model, "gn")
    path = _write(tmp_path / "R-50-GN.pkl", {"blobs": blobs})
    report = load_weights(model, path)
    assert report.source_format == "Detectron pickle, GN" and not report.notes
    assert not [key for key in report.missing if key.startswith(BODY)]
    _assert_blobs_loaded(model, blobs, "gn")
    crossed = load_weights(_r50(), path)
    assert any("norm kinds differ (GN into FrozenBatchNorm2d)" in note for note in crossed.notes)


def test_resnext_grouped_convs_and_shape_mismatches(tmp_path):
    resnext = _r50("frozen", "MODEL.RESNETS.NUM_GROUPS", "4", "MODEL.RESNETS.WIDTH_PER_GROUP", "16")
    assert resnext.backbone.body.layer1[0].conv2.groups == 4
    blobs = _detectron_blobs(resnext, "affine")
    report = load_weights(resnext, _write(tmp_path / "X-50.pkl", {"blobs": blobs}))
    assert not report.mismatched and not [key for key in report.missing if key.startswith(BODY)]
    _assert_blobs_loaded(resnext, blobs, "affine")
    plain = _detectron_blobs(_r50(), "affine", seed=1)
    report = load_weights(resnext, _write(tmp_path / "R-50.pkl", {"blobs": plain}))
    assert sorted(report.mismatched) == sorted(name for name in plain if "branch2b_w" in name)
    assert "res2_0_branch2b_w" in report.mismatched and BODY + "layer1.0.conv2.weight" in report.missing
    assert "res2_0_branch2b_w" not in report.renamed


def test_detection_blobs_and_momentum_are_unexpected(tmp_path):
    model = _r50()
    blobs = _detectron_blobs(model, "affine")
    extra = {"fpn_inner_res5_2_sum_w": np.zeros((256, 2048, 1, 1), np.float32),
             "conv1_w_momentum": np.zeros_like(blobs["conv1_w"]),
             "res2_0_branch2a_bn_gamma": blobs["res2_0_branch2a_bn_s"]}
    report = load_weights(model, _write(tmp_path / "model_final.pkl", {"blobs": {**blobs, **extra}, "cfg": "x"}))
    # Two blobs for one parameter: the first in sorted order loads (_bn_gamma before _bn_s).
    assert set(report.unexpected) == {"fc1000_b", "fc1000_w", "fpn_inner_res5_2_sum_w", "conv1_w_momentum",
                                      "res2_0_branch2a_bn_s"}
    assert report.renamed["res2_0_branch2a_bn_gamma"] == BODY + "layer1.0.bn1.weight"
    assert "backbone.fpn.inner_blocks.3.0.weight" in report.missing


def test_catalog_names_resolve_in_the_weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MABN_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    blobs = _detectron_blobs(_r50(), "affine")
    _write(tmp_path / "weights" / "R-50.pkl", {"blobs": blobs})
    model = _r50()
    report = load_weights(model, "catalog://ImageNetPretrained/MSRA/R-50")
    assert report.path == str(tmp_path / "weights" / "R-50.pkl") and not report.notes
    _assert_blobs_loaded(model, blobs, "affine")
    report = load_weights(_r50(stride_in_1x1=False), "catalog://ImageNetPretrained/MSRA/R-50")
    assert report.notes == ["catalog://ImageNetPretrained/MSRA/R-50 has the stride in the 1x1 conv but the body in "
                            "the 3x3: set MODEL.RESNETS.STRIDE_IN_1X1 True"]
    assert report.notes[0] in report.summary() and "\n" not in report.summary()


def test_missing_or_unknown_catalog_names_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MABN_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("MABN_CACHE", str(tmp_path / "cache"))
    assert weights_dir() == tmp_path / "cache" / "weights"
    with pytest.raises(UserError) as info:
        load_weights(_r50(), "catalog://ImageNetPretrained/FAIR/20171220/X-101-32x8d")
    message = str(info.value)
    assert "\n" not in message and f"expected the file {tmp_path / 'cache' / 'weights' / 'X-101-32x8d.pkl'}" in message
    assert "$MABN_WEIGHTS_DIR" in message and "nothing is downloaded" in message
    assert "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/20171220/X-101-32x8d.pkl" in message
    known = "not in the weight catalog; known: catalog://ImageNetPretrained/MSRA/R-50,"
    with pytest.raises(UserError, match=known) as info:
        load_weights(_r50(), "catalog://Caffe2Detectron/COCO/35858933/e2e_mask_rcnn_R-50-FPN_1x")
    assert "\n" not in str(info.value)


def test_catalog_file_names_are_the_published_names():
    assert {name: entry.file_name for name, entry in CATALOG.items()} == {
        "ImageNetPretrained/MSRA/R-50": "R-50.pkl", "ImageNetPretrained/MSRA/R-50-GN": "R-50-GN.pkl",
        "ImageNetPretrained/MSRA/R-101": "R-101.pkl", "ImageNetPretrained/MSRA/R-101-GN": "R-101-GN.pkl",
        "ImageNetPretrained/FAIR/20171220/X-101-32x8d": "X-101-32x8d.pkl"}
    assert all(entry.url.rsplit("/", 1)[1] == entry.file_name for entry in CATALOG.values())


def test_foreign_or_corrupt_pkl_files_are_one_line_errors(tmp_path):
    model = _r50()
    cases = {"truncated.pkl": (b"\x80\x02}q\x00(X\x07\x00\x00\x00conv1_w", "not a readable Detectron pickle"),
             "empty.pkl": (b"", "not a readable Detectron pickle"),
             "other.pkl": (_dumps({"encoder_w": np.zeros(2)}, "numpy2-p4"), "not a Detectron ResNet pickle"),
             "list.pkl": (_dumps([np.zeros(2)], "numpy2-p4"), "expected Detectron's")}
    for name, (payload, message) in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(UserError, match=message) as info:
            load_weights(model, str(tmp_path / name))
        assert "\n" not in str(info.value), name


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_files_named_pkl_are_read_as_torch_files(tmp_path, zip_format):
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pkl", _use_new_zipfile_serialization=zip_format)
    report = load_weights(build_detection_model(tiny_config("bn")), str(tmp_path / "resnet18.pkl"))
    assert report.source_format == "ResNet state dict"


@pytest.mark.parametrize("name", ["evil.pth", "evil.pkl"])
def test_unsafe_torch_pickles_are_still_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Reduce(os.system, f"touch {marker}")}, tmp_path / name)
    with pytest.raises(UserError, match="weights_only=True"):
        load_weights(build_detection_model(tiny_config("bn")), str(tmp_path / name))
    assert not marker.exists()
