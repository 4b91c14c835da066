"""The published (maskrcnn-benchmark) initialization of every part, measured on the built models:
the std of each weight group against its formula (5% tolerance, wider for small tensors) and zero
biases.

* body convs (stem, bottleneck convs, downsample): ``kaiming_uniform_(a=1)``: uniform with std
  ``1 / sqrt(fan_in)`` (0.0825 for the 7x7x3 stem, 0.125 for a 1x1 conv from 64 channels);
* FPN convs: ``kaiming_uniform_(a=1)``, zero biases;
* RPN head convs: normal(0.01), zero biases;
* box head: fc ``kaiming_uniform_(a=1)`` with zero biases; 4conv1fc convs normal(0.01);
* box predictor: class scores normal(0.01), deltas normal(0.001), zero biases;
* mask head convs and mask predictor: ``kaiming_normal_`` (fan_out, ReLU), zero biases.
"""
from __future__ import annotations

import math

import pytest
import torch
from det_helpers import CONFIG_DIR, tiny_config
from torch import nn

import mabn
from det.config import load_config
from det.modeling import build_detection_model
from det.modeling.heads import TwoMLPGroupNormHead


def _build(name: str, *opts: str) -> nn.Module:
    return build_detection_model(load_config(str(CONFIG_DIR / name), list(opts)))


@pytest.fixture(scope="module")
def frozen_r50():
    """The published R-50-FPN 1x Mask R-CNN: FrozenBN body, norm-free FPN (biases), 2fc box head."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _build("e2e_mask_rcnn_R_50_FPN_1x.yaml")


@pytest.fixture(scope="module")
def gn_xconv():
    """GN baseline with the 4conv1fc box head (GN everywhere, no conv biases)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return _build("gn_baselines/scratch_e2e_mask_rcnn_R_50_FPN_Xconv1fc_3x_gn.yaml")


@pytest.fixture(scope="module")
def mabn_model():
    """The published MABN model: every normalized conv a CenConv2d (the stored weight is initialized)."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return _build("e2e_mask_rcnn_R_50_FPN_mabn_2x_from_scratch.yaml")


def _fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


def assert_std(weight: torch.Tensor, expected: float, what: str) -> None:
    """Sample std within 5% of ``expected`` (more for tensors under ~2000 values: 3 standard errors)."""
    tolerance = max(0.05, 3 / math.sqrt(2 * weight.numel()))
    std = weight.detach().std().item()
    assert abs(std / expected - 1) < tolerance, f"{what}: std {std:.5f}, expected {expected:.5f}"


def assert_kaiming_uniform_a1(weight: torch.Tensor, what: str) -> None:
    """``kaiming_uniform_(a=1)``: std 1 / sqrt(fan_in), bounded by sqrt(3 / fan_in) (a normal
    draw of that std would exceed the bound)."""
    fan_in = _fan_in(weight)
    assert_std(weight, 1 / math.sqrt(fan_in), what)
    assert weight.detach().abs().max().item() <= math.sqrt(3 / fan_in) * (1 + 1e-6), what


def assert_zero_or_no_bias(module: nn.Module, what: str) -> None:
    assert module.bias is None or not module.bias.detach().any(), what


def _convs(module: nn.Module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("model_name", ["frozen_r50", "gn_xconv", "mabn_model"])
def test_body_convs_are_kaiming_uniform_a1(model_name, request):
    body = request.getfixturevalue(model_name).backbone.body
    convs = _convs(body)
    assert len(convs) == 53 and any("downsample" in name for name, _ in convs)
    for name, conv in convs:
        assert_kaiming_uniform_a1(conv.weight, f"body.{name}")
        assert conv.bias is None
    assert_std(body.conv1.weight, 0.0825, "stem (7x7x3: 1/sqrt(147))")
    assert_std(body.layer1[0].conv1.weight, 0.125, "layer1.0.conv1 (64 in, 1x1)")
    if model_name == "mabn_model":
        assert isinstance(body.conv1, mabn.CenConv2d) and isinstance(body.layer4[0].downsample[0], mabn.CenConv2d)


@pytest.mark.parametrize("model_name", ["frozen_r50", "gn_xconv", "mabn_model"])
def test_fpn_convs_are_kaiming_uniform_a1_with_zero_biases(model_name, request):
    fpn = request.getfixturevalue(model_name).backbone.fpn
    convs = _convs(fpn)
    assert len(convs) == 8
    for name, conv in convs:
        assert_kaiming_uniform_a1(conv.weight, f"fpn.{name}")
        assert_zero_or_no_bias(conv, f"fpn.{name}")
    assert (convs[0][1].bias is not None) is (model_name == "frozen_r50")


def test_rpn_head_is_normal_001_with_zero_biases(frozen_r50):
    head = frozen_r50.rpn.head
    for name, conv in _convs(head):
        assert_std(conv.weight, 0.01, f"rpn.head.{name}")
        assert conv.bias is not None and not conv.bias.detach().any()


def test_two_fc_box_head_is_kaiming_uniform_a1(frozen_r50):
    head = frozen_r50.roi_heads.box_head
    assert type(head).__name__ == "TwoMLPHead"
    for fc in (head.fc6, head.fc7):
        assert_kaiming_uniform_a1(fc.weight, "fc")
        assert not fc.bias.detach().any()
    assert_std(head.fc6.weight, 1 / math.sqrt(256 * 7 * 7), "fc6 (12544 in)")


def test_two_fc_box_head_with_gn_has_no_fc_bias():
    model = _build("gn_baselines/e2e_faster_rcnn_R_50_FPN_1x_gn.yaml")
    head = model.roi_heads.box_head
    assert isinstance(head, TwoMLPGroupNormHead)
    assert head.fc6.bias is None and head.fc7.bias is None
    assert isinstance(head.norm6, nn.GroupNorm) and (head.norm6.num_groups, head.norm6.num_channels) == (32, 1024)
    assert_kaiming_uniform_a1(head.fc6.weight, "fc6")
    assert_kaiming_uniform_a1(head.fc7.weight, "fc7")


@pytest.mark.parametrize("model_name", ["gn_xconv", "mabn_model"])
def test_conv_box_head_is_normal_001_and_its_fc_kaiming_uniform(model_name, request):
    head = request.getfixturevalue(model_name).roi_heads.box_head
    convs = _convs(head)
    assert len(convs) == 4
    for name, conv in convs:
        assert_std(conv.weight, 0.01, f"box_head.{name}")
        assert conv.bias is None
    fc = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(fc) == 1
    assert_kaiming_uniform_a1(fc[0].weight, "box_head fc")
    assert not fc[0].bias.detach().any()


def test_conv_box_head_without_norm_has_zero_conv_biases():
    model = build_detection_model(tiny_config("gn", "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR",
                                              "FPNXconv1fcFeatureExtractor"))
    convs = _convs(model.roi_heads.box_head)
    assert convs and all(conv.bias is not None and not conv.bias.detach().any() for _, conv in convs)
    assert not any(isinstance(m, nn.GroupNorm) for m in model.roi_heads.box_head.modules())


@pytest.mark.parametrize("model_name", ["frozen_r50", "gn_xconv"])
def test_box_predictor_is_normal_001_and_0001(model_name, request):
    predictor = request.getfixturevalue(model_name).roi_heads.box_predictor
    assert_std(predictor.cls_score.weight, 0.01, "cls_score")
    assert_std(predictor.bbox_pred.weight, 0.001, "bbox_pred")
    assert not predictor.cls_score.bias.detach().any() and not predictor.bbox_pred.bias.detach().any()


@pytest.mark.parametrize("model_name", ["frozen_r50", "gn_xconv", "mabn_model"])
def test_mask_head_and_predictor_are_kaiming_normal_fan_out(model_name, request):
    heads = request.getfixturevalue(model_name).roi_heads
    convs = _convs(heads.mask_head)
    assert len(convs) == 4
    for name, conv in convs:
        assert_std(conv.weight, math.sqrt(2 / (conv.out_channels * 9)), f"mask_head.{name}")
        assert_zero_or_no_bias(conv, f"mask_head.{name}")
    assert (convs[0][1].bias is not None) is (model_name == "frozen_r50")
    predictor = heads.mask_predictor
    # torch's fan_out of a ConvTranspose2d weight (in, out, kh, kw) is in x kh x kw.
    assert_std(predictor.conv5_mask.weight, math.sqrt(2 / (256 * 4)), "conv5_mask")
    assert_std(predictor.mask_fcn_logits.weight, math.sqrt(2 / 81), "mask_fcn_logits")
    assert not predictor.conv5_mask.bias.detach().any() and not predictor.mask_fcn_logits.bias.detach().any()
