"""convert_norm, convert_conv, the SyncBN conversions and fold_norms on real timm models.

timm builds its BatchNorm layers as ``BatchNormAct2d`` (a ``BatchNorm2d`` subclass with its own
forward and ``drop`` / ``act`` children): conversion must keep the activation, never drop it.
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn

import mabn

timm = pytest.importorskip("timm")

MODELS = ["resnet50", "efficientnet_b0", "regnety_008"]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial eval statistics, so eval outputs depend on every norm
        for m in model.modules():
            if mabn.is_batch_norm(m):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.mul_(torch.rand(c, generator=g) + 0.5)  # zero-initialized residual gammas stay 0
                m.bias.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)
    return model


def _input(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _activations(model: nn.Module) -> collections.Counter:
    return collections.Counter(type(m) for m in model.modules() if type(m).__module__ == "torch.nn.modules.activation")


def _norm_acts(model: nn.Module) -> int:
    return sum(type(m).__name__ in ("BatchNormAct2d", "SyncBatchNormAct") for m in model.modules())


@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.eval()(x)
    assert torch.isfinite(out).all()
    return out


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert ((out - ref).abs().max() / ref.abs().max()).item() < rel


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("target,cls", [("SyncBN", mabn.SyncBatchNorm), ("FrozenBN", mabn.FrozenBatchNorm2d),
                                        ("BRN", mabn.BatchRenorm2d)])
def test_bn_like_targets_keep_activations_and_eval_outputs(name, target, cls):
    model = _model(name)
    x = _input()
    expected, activations, norm_acts = _eval(model, x), _activations(model), _norm_acts(model)
    assert name == "resnet50" or norm_acts > 0

    mabn.convert_norm(model, target)

    assert _activations(model) == activations
    assert _norm_acts(model) == 0
    assert sum(isinstance(m, mabn.NormAct) and type(m.norm) is cls for m in model.modules()) == norm_acts
    assert not any(mabn.is_batch_norm(m) and not isinstance(m, cls) for m in model.modules())
    _assert_close(_eval(model, x), expected, 1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_mabn_cenconv_train_step_then_exact_fold(name):
    model = _model(name)
    activations = _activations(model)
    mabn.convert_norm(model, "MABN", B=2, real_B=8)
    mabn.convert_conv(model, "CenConv")
    assert _activations(model) == activations
    assert _norm_acts(model) == 0 and any(isinstance(m, mabn.MABN2d) for m in model.modules())
    assert any(isinstance(m, mabn.CenConv2d) for m in model.modules())

    # 64x64: at 32x32 the last stages see 1x1 maps, and B=2 statistics of 2 values per channel
    # give gradients of ~1e5 (a degenerate setting, not a conversion property)
    x = _input(64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = model(x).logsumexp(dim=1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    optimizer.step()

    expected = _eval(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx must trace the converted model
        folded = mabn.fold_norms(model)
    assert not any(mabn.is_batch_norm(m) for m in folded.modules())
    assert _activations(folded) == activations
    _assert_close(_eval(folded, x), expected, 1e-4)


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnety_008"])
def test_fold_unconverted_model_keeps_activations(name):
    model = _model(name)
    x = _input()
    expected, activations = _eval(model, x), _activations(model)
    folded = mabn.fold_norms(model)
    assert not any(mabn.is_batch_norm(m) for m in folded.modules())
    assert _activations(folded) == activations
    first = next(m for m in folded.modules() if isinstance(m, mabn.NormAct))
    assert isinstance(first.norm, nn.Identity) and type(first.act) in activations
    _assert_close(_eval(folded, x), expected, 1e-4)


def test_sync_batchnorm_round_trip_keeps_activations():
    model = _model("efficientnet_b0")
    x = _input()
    expected, activations, norm_acts = _eval(model, x), _activations(model), _norm_acts(model)
    weight = model.bn1.weight

    synced = mabn.convert_sync_batchnorm(model)
    assert type(synced.bn1) is mabn.NormAct and type(synced.bn1.norm) is mabn.SyncBatchNorm
    assert synced.bn1.norm.weight is weight and _activations(synced) == activations
    assert "bn1.norm.running_var" in synced.state_dict()
    _assert_close(_eval(synced, x), expected, 1e-5)

    reverted = mabn.revert_sync_batchnorm(synced)
    assert type(reverted.bn1) is mabn.NormAct and type(reverted.bn1.norm) is nn.BatchNorm2d
    assert _activations(reverted) == activations
    _assert_close(_eval(reverted, x), expected, 1e-5)

    # timm's own conversion gives SyncBatchNormAct layers; reverting keeps their activation too
    timm_synced = timm.layers.convert_sync_batchnorm(_model("efficientnet_b0"))
    assert _norm_acts(timm_synced) == norm_acts
    reverted = mabn.revert_sync_batchnorm(timm_synced)
    assert _norm_acts(reverted) == 0 and _activations(reverted) == activations
    _assert_close(_eval(reverted, x), expected, 1e-5)


def test_split_batchnorm_is_refused_and_model_left_unchanged():
    from timm.layers.split_batchnorm import convert_splitbn_model

    model = convert_splitbn_model(timm.create_model("resnet18", pretrained=False, num_classes=10), 2)
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(mabn.NotConvertibleError, match=r"bn1 \(timm\.layers\.split_batchnorm\.SplitBatchNorm2d\).*aux_bn"):
        mabn.convert_norm(model, "MABN")
    with pytest.raises(mabn.NotConvertibleError, match="SplitBatchNorm2d"):
        mabn.convert_sync_batchnorm(model)
    assert [type(m) for m in model.modules()] == kinds
