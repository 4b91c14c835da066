"""cls.norms + cls.models: the trainer builds the right layers for each --norm / --norm_batch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mabn
from cls.config import parse_args, resolve
from mabn.utils.errors import UserError
from cls.models import build_model
from cls.norms import norm_choice


def _choice(argv, world=1):
    args = resolve(parse_args(argv), world)
    return norm_choice(args.norm, args.per_gpu_batch, args.norm_batch, args.ma_batch, args.warmup_iters,
                       args.gn_groups)


@pytest.mark.parametrize("argv, name, kwargs, conv", [
    (["--norm", "bn", "--batch_size", "16"], "BN", {}, nn.Conv2d),
    (["--norm", "bn", "--batch_size", "16", "--norm_batch", "16"], "BN", {}, nn.Conv2d),
    (["--norm", "bn", "--batch_size", "16", "--norm_batch", "2"], "BN", {"B": 2}, nn.Conv2d),
    (["--norm", "brn", "--batch_size", "16", "--norm_batch", "4"], "BRN", {"B": 4}, nn.Conv2d),
    (["--norm", "brn", "--batch_size", "16"], "BRN", {}, nn.Conv2d),
    (["--norm", "mabn", "--batch_size", "16", "--norm_batch", "2", "--ma_batch", "8", "--warmup_iters", "7"], "MABN",
     {"B": 2, "real_B": 8, "warmup_iters": 7, "split_batch": True}, mabn.CenConv2d),
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


def test_unknown_arch_and_norm():
    with pytest.raises(UserError, match="resnet20"):
        build_model("vgg", 10, norm_choice("bn", 2))
    with pytest.raises(UserError, match="mabn"):
        norm_choice("weird", 2)
