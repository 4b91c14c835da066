"""det.modeling.weights: the four MODEL.WEIGHT formats, mapped tensors compared exactly."""
from __future__ import annotations

import pytest
import torch
import torchvision
from det_helpers import tiny_config

import mabn
from det.modeling import build_detection_model, load_weights
from mabn.utils.errors import UserError

WINDOW = 16  # real_B // B of the tiny MABN config


def _resnet18_state(seed: int = 1) -> dict:
    """A torchvision ResNet-18 state dict with non-trivial statistics."""
    torch.manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1234)
    return state


def _published_mabn_state(source: dict, iters: float = 500.0) -> dict:
    """The published cls format: ResNet keys, MABN buffers running_var (1, C, 1, 1), sta_matrix,
    pre_x2, pre_gz (W, C) and a float iters; no running_mean or num_batches_tracked."""
    state = {}
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            base = key[: -len("num_batches_tracked")]
            channels = source[base + "weight"].shape[0]
            state[base + "iters"] = torch.tensor(iters)
            state[base + "sta_matrix"] = torch.full((WINDOW, WINDOW), 1.0 / WINDOW)
            state[base + "pre_x2"] = torch.rand(WINDOW, channels)
            state[base + "pre_gz"] = torch.randn(WINDOW, channels)
        elif key.endswith("running_var"):
            state[key] = (torch.rand_like(value) + 0.5).view(1, -1, 1, 1)
        elif not key.endswith("running_mean"):
            state[key] = value
    return state


def _body_state(model) -> dict:
    prefix = "backbone.body."
    return {key[len(prefix):]: value for key, value in model.state_dict().items() if key.startswith(prefix)}


def test_torchvision_resnet_into_bn_body_is_exact(tmp_path):
    source = _resnet18_state()
    torch.save(source, tmp_path / "resnet18.pth")
    model = build_detection_model(tiny_config("bn"))
    report = load_weights(model, str(tmp_path / "resnet18.pth"))
    assert report.source_format == "ResNet state dict"
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"] and not report.mismatched
    body = _body_state(model)
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(body[key], value), key
    assert all(key.startswith(("backbone.fpn.", "rpn.", "roi_heads.")) for key in report.missing)
    assert len(report.loaded) == len(source) - 2


def test_bn_resnet_into_mabn_body_gets_second_moment(tmp_path):
    source = _resnet18_state()
    torch.save(source, tmp_path / "resnet18.pth")
    model = build_detection_model(tiny_config("mabn"))
    load_weights(model, str(tmp_path / "resnet18.pth"))
    layer = model.backbone.body.layer1[0].bn1
    expected = source["layer1.0.bn1.running_var"] + source["layer1.0.bn1.running_mean"].square()
    assert torch.equal(layer.running_var, expected) and not layer.running_mean.any()
    assert layer.num_batches_tracked == 0  # the BN step counter is not MABN's schedule
    assert torch.equal(model.backbone.body.conv1.weight, source["conv1.weight"])


def test_published_mabn_cls_state_dict_is_exact(tmp_path):
    source = _published_mabn_state(_resnet18_state())
    torch.save({"module." + key: value for key, value in source.items()}, tmp_path / "R18-wc.pth")
    model = build_detection_model(tiny_config("mabn"))
    report = load_weights(model, str(tmp_path / "R18-wc.pth"))
    assert report.source_format == "published MABN cls state dict"
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert not [key for key in report.missing if key.startswith("backbone.body.")]
    body = dict(model.backbone.body.named_modules())
    for key, value in source.items():
        module_name, _, leaf = key.rpartition(".")
        if key.startswith("fc.") or leaf in ("sta_matrix", "iters"):
            continue
        target = {"pre_x2": "buffer_x2", "pre_gz": "buffer_gz"}.get(leaf, leaf)
        assert torch.equal(getattr(body[module_name], target), value.reshape(getattr(body[module_name], target).shape)), key
    layer = model.backbone.body.layer4[1].bn2
    assert layer.num_batches_tracked == 500 and layer.groups_seen == 500 * WINDOW and not layer.running_mean.any()


def test_cls_checkpoint_is_exact(tmp_path):
    """A checkpoint of our cls trainer: {"model": torchvision ResNet with MABN and CenConv, ...}."""
    torch.manual_seed(2)
    net = torchvision.models.resnet18(weights=None, norm_layer=lambda c: mabn.MABN2d(c, B=2, real_B=32, split_batch=True))
    net = mabn.convert_conv(net, "CenConv")
    net.train()(torch.randn(4, 3, 32, 32)).sum().backward()  # fills the MABN buffers
    state = {"module." + key: value for key, value in net.state_dict().items()}
    torch.save({"model": state, "optimizer": {}, "iteration": 3, "epoch": 3}, tmp_path / "checkpoint.pth")
    model = build_detection_model(tiny_config("mabn"))
    report = load_weights(model, str(tmp_path / "checkpoint.pth"))
    assert report.source_format == "cls checkpoint" and not report.mismatched
    body = _body_state(model)
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(body[key], value), key
    assert model.backbone.body.bn1.num_batches_tracked == 1


def test_detection_checkpoint_round_trip_and_other_num_classes(tmp_path):
    model = build_detection_model(tiny_config("mabn"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "optimizer": {}, "scheduler": {},
                "iteration": 10}, tmp_path / "model_0000010.pth")
    fresh = build_detection_model(tiny_config("mabn"))
    report = load_weights(fresh, str(tmp_path / "model_0000010.pth"))
    assert report.source_format == "detection checkpoint"
    assert not report.missing and not report.unexpected and len(report.loaded) == len(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    other = build_detection_model(tiny_config("mabn", "MODEL.ROI_BOX_HEAD.NUM_CLASSES", "7"))
    report = load_weights(other, str(tmp_path / "model_0000010.pth"))
    assert sorted(report.mismatched) == sorted(k for k in model.state_dict() if k.startswith(
        ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")))
    assert "6 of another shape" in report.summary()
    assert torch.equal(other.backbone.body.conv1.weight, model.backbone.body.conv1.weight)


@pytest.mark.parametrize("weight, message", [
    ("catalog://ImageNetPretrained/MSRA/R-50", "expected the file .*R-50.pkl .*MABN_WEIGHTS_DIR"),
    ("https://example.com/R-50.pth", "only local files"),
    ("/no/such/file.pth", "no such file"),
])
def test_remote_or_missing_weights_are_one_line_errors(weight, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MABN_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(UserError, match=message) as info:
        load_weights(build_detection_model(tiny_config("bn")), weight)
    assert "\n" not in str(info.value)


def test_unreadable_or_foreign_files_are_errors(tmp_path):
    model = build_detection_model(tiny_config("bn"))
    (tmp_path / "R-50.pth").write_bytes(b"\x80\x02}q\x00.garbage")
    with pytest.raises(UserError, match="weights_only=True"):
        load_weights(model, str(tmp_path / "R-50.pth"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="neither a detection checkpoint nor a ResNet"):
        load_weights(model, str(tmp_path / "other.pth"))
