"""cls.norms + cls.models: the trainer builds the right layers for each --norm / --norm_batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mabn
from cls.config import parse_args, resolve
from mabn.utils.errors import UserError
from cls.models import build_model
from cls.norms import norm_choice, norm_choice_from_args

BRN_PUBLISHED = {"warmup_steps": 5000, "r_ramp_end": 40000, "d_ramp_end": 25000, "r_max": 3.0, "d_max": 5.0}


def _choice(argv, world=1):
    return norm_choice_from_args(resolve(parse_args(argv), world))


@pytest.mark.parametrize("argv, name, kwargs, conv", [
    (["--norm", "bn", "--batch_size", "16"], "BN", {}, nn.Conv2d),
    (["--norm", "bn", "--batch_size", "16", "--norm_batch", "16"], "BN", {}, nn.Conv2d),
    (["--norm", "bn", "--batch_size", "16", "--norm_batch", "2"], "BN", {"B": 2}, nn.Conv2d),
    (["--norm", "brn", "--batch_size", "16", "--norm_batch", "4"], "BRN", {"B": 4, **BRN_PUBLISHED}, nn.Conv2d),
    (["--norm", "brn", "--batch_size", "16"], "BRN", BRN_PUBLISHED, nn.Conv2d),
    (["--norm", "brn", "--batch_size", "16", "--brn_warmup", "10", "--brn_r_ramp_end", "30", "--brn_d_ramp_end", "20",
      "--brn_r_max", "2", "--brn_d_max", "0.5"], "BRN",
     {"warmup_steps": 10, "r_ramp_end": 30, "d_ramp_end": 20, "r_max": 2.0, "d_max": 0.5}, nn.Conv2d),
    (["--norm", "mabn", "--batch_size", "16", "--norm_batch", "2", "--ma_batch", "8", "--warmup_iters", "7"], "MABN",
     {"B": 2, "real_B": 8, "warmup_iters": 7, "split_batch": True}, mabn.CenConv2d),
    (["--norm", "mabn", "--batch_size", "16", "--mabn_r_warmup", "50"], "MABN",
     {"B": 2, "real_B": 32, "warmup_iters": 100, "split_batch": True, "r_warmup_iters": 50}, mabn.CenConv2d),
    (["--norm", "syncbn", "--batch_size", "16"], "SyncBN", {}, nn.Conv2d),
    (["--norm", "gn", "--batch_size", "16", "--norm_batch", "2"], "GN", {}, nn.Conv2d),
    (["--norm", "in"], "IN", {}, nn.Conv2d),
    (["--norm", "ln"], "LN", {}, nn.Conv2d),
    (["--norm", "frozenbn"], "FrozenBN", {}, nn.Conv2d),
])
def test_norm_choice_calls_the_factory_with_the_contract(monkeypatch, argv, name, kwargs, conv):
    calls = []

    def fake_get_norm(norm, channels, **options):
        calls.append((norm, channels, options))
        return nn.Identity()

    choice = _choice(argv)
    assert choice.conv is conv
    monkeypatch.setattr(mabn, "get_norm", fake_get_norm)
    model = build_model("resnet20", 10, choice, choice.conv)
    expected = dict(kwargs)
    channels = [c for _, c, _ in calls]
    assert len(calls) == 21 and channels[0] == 16 and max(channels) == 64  # 19 convs + 2 projections
    for norm, c, options in calls:
        assert norm == name
        if name == "GN":
            assert options == {"num_groups": c if c < 32 else 32}
        else:
            assert options == expected
    assert all(isinstance(m, conv) for m in model.modules() if isinstance(m, nn.Conv2d))


def _norm_layers(model):
    return [m for m in model.modules() if not isinstance(m, (nn.Conv2d, nn.Linear, nn.ReLU, nn.Sequential,
                                                             nn.AdaptiveAvgPool2d, nn.MaxPool2d))
            and not list(m.children())]


@pytest.mark.parametrize("argv, layer_type", [
    (["--norm", "bn", "--batch_size", "16"], nn.BatchNorm2d),
    (["--norm", "mabn", "--batch_size", "16", "--norm_batch", "2", "--ma_batch", "8"], mabn.MABN2d),
    (["--norm", "brn", "--batch_size", "16", "--norm_batch", "2"], mabn.BatchRenorm2d),
    (["--norm", "syncbn"], mabn.SyncBatchNorm),
    (["--norm", "gn"], nn.GroupNorm),
])
def test_real_layers(argv, layer_type):
    choice = _choice(argv)
    model = build_model("resnet20", 10, choice, choice.conv)
    layers = _norm_layers(model)
    assert len(layers) == 21 and all(isinstance(m, layer_type) for m in layers)
    if layer_type is mabn.MABN2d:
        assert all(m.B == 2 and m.real_B == 8 and m.split_batch for m in layers)
    # Published initialization: norm weight 1 and bias 0; convs Kaiming fan_out.
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in layers)
    conv = model.layer3[0].conv1
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1


@pytest.mark.parametrize("argv, expected", [
    ([], {"warmup_steps": 5000, "r_ramp_end": 40000, "d_ramp_end": 25000, "r_max": 3.0, "d_max": 5.0}),
    (["--brn_warmup", "3", "--brn_r_ramp_end", "9", "--brn_d_ramp_end", "6", "--brn_r_max", "1.5", "--brn_d_max", "0"],
     {"warmup_steps": 3, "r_ramp_end": 9, "d_ramp_end": 6, "r_max": 1.5, "d_max": 0.0}),
])
def test_brn_schedule_reaches_the_layers(argv, expected):
    choice = _choice(["--norm", "brn", "--batch_size", "8", "--norm_batch", "2", *argv])
    layers = [m for m in build_model("resnet20", 10, choice, choice.conv).modules()
              if isinstance(m, mabn.BatchRenorm2d)]
    assert len(layers) == 21
    for layer in layers:
        assert {k: getattr(layer, k) for k in expected} == expected and layer.B == 2


@pytest.mark.parametrize("argv, warmup, r_warmup", [
    ([], 100, 1000),  # the layer's default: max(1000, warmup_iters)
    (["--warmup_iters", "2000"], 2000, 2000),
    (["--warmup_iters", "5", "--mabn_r_warmup", "20"], 5, 20),
])
def test_mabn_schedule_reaches_the_layers(argv, warmup, r_warmup):
    choice = _choice(["--norm", "mabn", "--batch_size", "8", *argv])
    layers = [m for m in build_model("resnet20", 10, choice, choice.conv).modules() if isinstance(m, mabn.MABN2d)]
    assert len(layers) == 21 and all((m.warmup_iters, m.r_warmup_iters) == (warmup, r_warmup) for m in layers)


def test_ghost_batch_norm_from_norm_batch():
    choice = _choice(["--norm", "bn", "--batch_size", "16", "--norm_batch", "2"])
    layer = choice(8)
    assert isinstance(layer, nn.BatchNorm2d) and type(layer) is not nn.BatchNorm2d  # ghost BN
    # Trainer-level check: training statistics are those of each group of 2 samples.
    x = torch.randn(16, 8, 3, 3)
    y = layer.train()(x)
    group = x[:2]
    expected = (group - group.mean((0, 2, 3), keepdim=True)) / torch.sqrt(group.var((0, 2, 3), unbiased=False, keepdim=True) + layer.eps)
    torch.testing.assert_close(y[:2], expected, rtol=1e-4, atol=1e-4)


def test_imagenet_resnets_keep_published_names():
    choice = norm_choice("mabn", 32, 2)
    names = set(build_model("resnet50", 1000, choice, choice.conv).state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.weight", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in names
    out = build_model("resnet18", 7, norm_choice("bn", 2), nn.Conv2d)(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch, blocks", [("resnet8", 1), ("resnet14", 2), ("resnet20", 3)])
def test_cifar_resnets_have_their_blocks_per_stage(arch, blocks):
    choice = norm_choice("mabn", 8, 2)
    model = build_model(arch, 16, choice, choice.conv)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
    assert len(_norm_layers(model)) == 6 * blocks + 3  # stem, two per block, two projections
    assert all(isinstance(m, mabn.CenConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(8, 3, 24, 24)).shape == (8, 16)


def test_unknown_arch_and_norm():
    with pytest.raises(UserError, match="resnet20"):
        build_model("vgg", 10, norm_choice("bn", 2))
    with pytest.raises(UserError, match="mabn"):
        norm_choice("weird", 2)


def test_every_arch_choice_of_the_trainer_has_a_builder_and_a_stride():
    from cls.config import ARCHS  # a literal there: the parser does not import the models
    from cls.models import ARCH_BUILDERS, OUTPUT_STRIDES

    assert set(ARCHS) == set(ARCH_BUILDERS) == set(OUTPUT_STRIDES)
