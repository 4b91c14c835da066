"""Tests for mabn.fold.fold_norms (CPU only, small inputs)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import mabn
from mabn.fold import fold_conv_norm, fold_norms

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# fx must trace every model here except the one that checks the fallback (pytest.warns there)
pytestmark = pytest.mark.filterwarnings("error:fold_norms")


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics and affine parameters on every BN-like layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not mabn.is_batch_norm(m):
                continue
            ref = m.running_var if m.running_var is not None else m.weight
            c = ref.numel()

            def rand(lo, hi):
                return (torch.rand(c, generator=g) * (hi - lo) + lo).to(ref)

            if m.running_var is not None:
                m.running_var.copy_(rand(0.5, 2.0))
                if not mabn.is_mabn(m):  # MABN keeps running_mean at zero
                    m.running_mean.copy_(rand(-0.3, 0.3))
            if m.weight is not None:
                m.weight.copy_(rand(0.5, 1.5))
            if m.bias is not None:
                m.bias.copy_(rand(-0.3, 0.3))
    return model


def _assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _norms(model: nn.Module):
    return [m for m in model.modules() if mabn.is_batch_norm(m)]


def _check_folded(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    model.eval()
    with torch.no_grad():
        ref = model(x)
    folded = fold_norms(model, **kwargs)
    assert not folded.training
    with torch.no_grad():
        out = folded(x)
    _assert_same(out, ref)
    return folded


# ---------------------------------------------------------------- ResNet-50, every foldable norm

def _resnet50(norm: str) -> nn.Module:
    torch.manual_seed(0)
    if norm == "MABN":
        model = torchvision.models.resnet50(weights=None)
        mabn.convert_norm(model, "MABN")
        mabn.convert_conv(model, "CenConv")
    else:
        layer = {"BN": nn.BatchNorm2d, "FrozenBN": FrozenBatchNorm2d, "BRN": mabn.BatchRenorm2d,
                 "SyncBN": mabn.SyncBatchNorm}[norm]
        model = torchvision.models.resnet50(weights=None, norm_layer=layer)
    return _randomize_norms(model)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "BRN", "MABN", "SyncBN"])
def test_resnet50_all_norms_folded(norm):
    model = _resnet50(norm)
    n_convs = sum(isinstance(m, CONV_TYPES) for m in model.modules())
    if norm == "MABN":
        assert any(isinstance(m, mabn.CenConv2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    folded = _check_folded(model, x)

    assert type(folded) is type(model)
    assert _norms(folded) == []
    convs = [m for m in folded.modules() if isinstance(m, CONV_TYPES)]
    assert len(convs) == n_convs
    assert all(type(m) is nn.Conv2d and m.bias is not None for m in convs)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.layer1[0].downsample[1], nn.Identity)
    # the input model is untouched (inplace=False)
    assert len(_norms(model)) == n_convs


# ---------------------------------------------------------------- structure of the graph

class _SharedConv(nn.Module):
    """One conv called twice; the norm after its second call must not absorb it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.conv(x))))


class _SharedNorm(nn.Module):
    """One norm applied after two different convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn3(self.conv3(self.bn(self.conv1(x)) + self.bn(self.conv2(x))))


class _TwoConsumers(nn.Module):
    """The conv output feeds the norm and a residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


def test_shared_conv_called_twice_is_left_unfolded():
    model = _randomize_norms(_SharedConv())
    folded = _check_folded(model, torch.randn(2, 4, 8, 8))
    assert type(folded.conv) is nn.Conv2d and isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded.conv.weight, model.conv.weight, rtol=0, atol=0)


def test_norm_shared_by_two_convs_is_left_unfolded():
    model = _randomize_norms(_SharedNorm())
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded.conv1.weight, model.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(folded.conv2.weight, model.conv2.weight, rtol=0, atol=0)
    assert isinstance(folded.bn3, nn.Identity)  # the unshared pair still folds


def test_conv_with_two_consumers_is_left_unfolded():
    model = _randomize_norms(_TwoConsumers())
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded.conv.weight, model.conv.weight, rtol=0, atol=0)


def test_sequential_conv_bn_relu():
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
                                           nn.BatchNorm2d(8), nn.ReLU(inplace=True)))
    folded = _check_folded(model, torch.randn(2, 3, 16, 16))
    assert type(folded) is nn.Sequential
    assert type(folded[0]) is nn.Conv2d and folded[0].bias is not None
    assert folded[0].stride == (2, 2) and folded[0].padding == (1, 1)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[2], nn.ReLU)


def test_conv1d_mabn1d_after_training():
    torch.manual_seed(0)
    model = nn.Sequential(mabn.CenConv1d(4, 6, 3, padding=2, dilation=2, bias=True, padding_mode="reflect"),
                          mabn.MABN1d(6, B=2, real_B=4, warmup_iters=2, r_warmup_iters=2), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model.train()
    for _ in range(4):  # real statistics from training forwards
        model(torch.randn(2, 4, 10) * 3 + 1)
    assert model[1].running_var.sub(1).abs().max() > 0.01
    folded = _check_folded(model, torch.randn(2, 4, 10))
    assert type(folded[0]) is nn.Conv1d and folded[0].padding_mode == "reflect"
    assert folded[0].dilation == (2,) and isinstance(folded[1], nn.Identity)


def test_conv3d_bn3d_grouped_with_conv_bias():
    model = _randomize_norms(nn.Sequential(nn.Conv3d(4, 6, 3, padding=1, groups=2, bias=True, padding_mode="circular"),
                                           nn.BatchNorm3d(6)))
    folded = _check_folded(model, torch.randn(2, 4, 5, 6, 7))
    assert type(folded[0]) is nn.Conv3d and folded[0].groups == 2 and folded[0].padding_mode == "circular"
    assert isinstance(folded[1], nn.Identity)


def test_affine_false_and_frozen_and_brn_pairs():
    model = _randomize_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False),
        nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4),
        nn.Conv2d(4, 4, 1), mabn.BatchRenorm2d(4)))
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert _norms(folded) == []


def test_norm_without_running_stats_or_without_conv_is_kept():
    model = _randomize_norms(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),  # batch stats in eval
        nn.ReLU(), nn.BatchNorm2d(4),                                      # no conv before it
        nn.ConvTranspose2d(4, 4, 2), nn.BatchNorm2d(4)))                   # not folded (documented)
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert len(_norms(folded)) == 3 and type(folded[0]) is nn.Conv2d


def test_module_held_under_two_names_is_replaced_everywhere():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.alias = self.conv  # same object, second attribute, never called through it

        def forward(self, x):
            return self.bn(self.conv(x))

    folded = _check_folded(_randomize_norms(Aliased()), torch.randn(2, 3, 8, 8))
    assert folded.alias is folded.conv and folded.conv.bias is not None
    assert isinstance(folded.bn, nn.Identity)


def test_conv_weight_read_elsewhere_is_left_unfolded():
    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv.weight.sum()

    folded = _check_folded(_randomize_norms(ReadsWeight()), torch.randn(2, 3, 4, 4))
    assert isinstance(folded.bn, nn.BatchNorm2d)


def test_inplace_false_leaves_original_untouched_and_inplace_true_edits():
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model.train()
    before = copy.deepcopy(model.state_dict())
    folded = fold_norms(model)
    assert folded is not model and model.training
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is not None
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x)
    same = fold_norms(model, inplace=True)
    assert same is model and isinstance(model[1], nn.Identity)
    with torch.no_grad():
        _assert_same(model(x), ref)


def test_dtype_preserved_float64():
    model = _randomize_norms(nn.Sequential(mabn.CenConv2d(3, 5, 3, bias=False), mabn.MABN2d(5))).double()
    folded = _check_folded(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert folded[0].weight.dtype == torch.float64 and folded[0].bias.dtype == torch.float64


def test_untraceable_model_falls_back_to_sequential_pairs():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.body(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
                y = -y
            return self.bn(self.conv(y))

    model = _randomize_norms(DataDependent()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        folded = fold_norms(model)
    with torch.no_grad():
        _assert_same(folded(x), ref)
    assert isinstance(folded.body[1], nn.Identity) and folded.body[0].bias is not None
    assert isinstance(folded.bn, nn.BatchNorm2d)  # attribute pair: not found without fx


def test_fold_conv_norm_rejects_unfoldable():
    with pytest.raises(TypeError):
        fold_conv_norm(nn.ConvTranspose2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(TypeError):
        fold_conv_norm(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3))
    with pytest.raises(ValueError):
        fold_conv_norm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3))


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def folded_resnet18():
    torch.manual_seed(0)
    model = _randomize_norms(torchvision.models.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    folded = _check_folded(model, x)
    assert _norms(folded) == []
    with torch.no_grad():
        ref = folded(x)
    return folded, x, ref


def test_folded_resnet18_torch_export(folded_resnet18):
    folded, x, ref = folded_resnet18
    program = torch.export.export(folded, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets)
    with torch.no_grad():
        _assert_same(program.module()(x), ref)


def test_folded_resnet18_onnx_export(folded_resnet18):
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    folded, x, ref = folded_resnet18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(folded, (x,), dynamo=True, verbose=False)
    proto = onnx_program.model_proto
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    out = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    _assert_same(torch.from_numpy(out), ref)


# ---------------------------------------------------------------- norms that do more than normalize

class _BNAct(nn.BatchNorm2d):
    """timm's norm-activation convention: normalize, then ``drop``, then ``act``."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_norm_activation_layer_folds_and_keeps_its_activation():
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), _BNAct(4), nn.Conv2d(4, 4, 1), _BNAct(4)))
    act = model[1].act
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert _norms(folded) == []
    assert type(folded[1]) is mabn.NormAct and isinstance(folded[1].norm, nn.Identity)
    assert type(folded[1].act) is nn.SiLU and folded[1].act is not act  # a deep copy (inplace=False)
    with pytest.raises(TypeError, match="drop, act after normalizing"):
        fold_conv_norm(model[0], model[1])


def test_converted_norm_activation_layer_folds_with_and_without_fx():
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), _BNAct(4), nn.Conv2d(4, 4, 1), _BNAct(4)))
    mabn.convert_norm(model, "BRN")
    assert type(model[1]) is mabn.NormAct
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert _norms(folded) == [] and type(folded[3].act) is nn.SiLU

    class Untraceable(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            y = self.body(x)
            return -y if y.sum() > 0 else y

    model = Untraceable(model).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        folded = fold_norms(model)
    assert _norms(folded) == [] and isinstance(folded.body[1].norm, nn.Identity)
    with torch.no_grad():
        _assert_same(folded(x), ref)


def test_norm_with_its_own_forward_is_not_folded():
    model = _randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBN(4)))
    folded = _check_folded(model, torch.randn(2, 3, 8, 8))
    assert type(folded[1]) is _ScaledBN and torch.equal(folded[0].weight, model[0].weight)
