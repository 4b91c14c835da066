"""convert_norm / convert_conv on torchvision models and small nets."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn import (BatchRenorm2d, CenConv2d, GhostBatchNorm2d, MABN1d, MABN2d, NormAct, NotConvertibleError,
                  SyncBatchNorm, convert_conv, convert_norm, convert_sync_batchnorm, is_mabn, mabn_running_var)


def _randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def test_bn_to_mabn_carries_affine_and_second_moment():
    model = _randomize_bn(torchvision.models.resnet18())
    bn = model.layer1[0].bn1
    weight, mean, var = bn.weight, bn.running_mean.clone(), bn.running_var.clone()
    out = convert_norm(model, "MABN", B=2, real_B=32)
    assert out is model
    mabn = model.layer1[0].bn1
    assert type(mabn) is MABN2d and mabn.weight is weight and mabn.B == 2
    torch.testing.assert_close(mabn.running_var, var + mean ** 2)
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, MABN2d) for m in model.modules())


@pytest.mark.parametrize("target", ["BN", "SyncBN", "FrozenBN", "BRN"])
def test_mabn_to_bn_like_keeps_eval_outputs(target):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), MABN2d(4, 1, 2, warmup_iters=0), nn.ReLU())
    for _ in range(3):
        net(torch.randn(1, 3, 8, 8)).sum().backward()
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    convert_norm(net, target)
    assert not isinstance(net[1], MABN2d)
    torch.testing.assert_close(net.eval()(x), expected)


def test_bn_round_trip_through_syncbn_and_brn_keeps_eval_outputs():
    model = _randomize_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    convert_norm(model, "SyncBN")
    assert isinstance(model.bn1, SyncBatchNorm)
    torch.testing.assert_close(model(x), expected)
    convert_norm(model, "BRN")
    assert isinstance(model.bn1, BatchRenorm2d)
    torch.testing.assert_close(model.eval()(x), expected)


def test_frozen_bn_source_and_root_replacement():
    frozen = FrozenBatchNorm2d(4)
    with torch.no_grad():
        frozen.running_mean.fill_(1.0)
    new = convert_norm(frozen, "BN")
    assert type(new) is nn.BatchNorm2d and torch.equal(new.running_mean, torch.ones(4))
    assert isinstance(convert_norm(nn.BatchNorm2d(4), ""), nn.Identity)


def test_dim_dtype_and_training_flag_preserved():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double().eval()
    convert_norm(net, "MABN", B=1, real_B=4)
    assert type(net[1]) is MABN1d and net[1].running_var.dtype == torch.float64 and not net[1].training
    assert net(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("target,cls", [("GN", nn.GroupNorm), ("IN", nn.InstanceNorm2d), ("LN", nn.GroupNorm)])
def test_affine_only_targets(target, cls):
    model = _randomize_bn(torchvision.models.resnet18())
    weight = model.bn1.weight
    convert_norm(model, target)
    assert isinstance(model.bn1, cls) and model.bn1.weight is weight
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_source_filter_and_callable_target():
    net = nn.Sequential(nn.BatchNorm2d(4), MABN2d(4))
    convert_norm(net, lambda c, **kw: nn.GroupNorm(2, c), source=nn.BatchNorm2d)
    assert isinstance(net[0], nn.GroupNorm) and isinstance(net[1], MABN2d)


def test_convert_conv_both_ways():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    weight = model.conv1.weight.detach().clone()
    convert_conv(model, "CenConv")
    assert all(isinstance(m, CenConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(model.conv1.weight, weight)
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    convert_conv(model, "Conv")
    assert not any(isinstance(m, CenConv2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="CenConv"):
        convert_conv(model, "Deformable")


def test_convert_conv_keeps_arguments():
    conv = nn.Conv2d(4, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=2, bias=True, padding_mode="circular")
    cen = convert_conv(conv)
    assert isinstance(cen, CenConv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(cen, attr) == getattr(conv, attr), attr
    assert torch.equal(cen.bias, conv.bias)


def _package_imports() -> dict:
    """``{module: {mabn modules it imports}}`` for every module of the package, function-level
    imports included (a lazy import is still an edge of the dependency graph)."""
    import ast
    from pathlib import Path

    import mabn

    root = Path(mabn.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(("mabn",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mabn"):
                edges.add(node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("mabn"))
        graph[name] = edges - {name}
    return graph


def test_package_import_graph_has_no_cycle():
    graph = _package_imports()
    assert graph["mabn.convert"] >= {"mabn.factory"} and "mabn.convert" not in graph["mabn.factory"]
    for layer in ("mabn.sync_batchnorm", "mabn.moving_average_bn", "mabn.batch_renorm", "mabn.ghost_batchnorm",
                  "mabn.cen_conv", "mabn.factory"):
        assert not graph[layer] & {"mabn", "mabn.convert", "mabn.fold"}, layer
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for dep in graph.get(module, ()):
            if dep == "mabn" or dep not in graph:
                continue
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [module, dep])}"
            if dep not in state:
                visit(dep, stack + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


# ---------------------------------------------------------------- layers that do more than normalize

class _PlainSubclass(nn.BatchNorm2d):
    """Keeps BatchNorm's forward: converted like BatchNorm."""


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class _BNReLU(nn.BatchNorm2d):
    """A norm-activation layer in timm's convention: normalize, then drop, then act."""

    def __init__(self, c, act_first=False):
        super().__init__(c)
        self.act = nn.ReLU()
        self.drop = nn.Identity()
        self.act_first = act_first

    def forward(self, x):
        if self.act_first:
            return super().forward(self.act(x))
        return self.act(self.drop(super().forward(x)))


class _WithAux(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.aux = nn.BatchNorm2d(c)


def _net(norm):
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))


def test_plain_subclass_is_converted():
    net = _net(_PlainSubclass(4))
    convert_norm(net, "BRN")
    assert type(net[1]) is BatchRenorm2d


def test_norm_activation_layer_keeps_its_activation():
    net = _net(_BNReLU(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    act, drop, weight = net[1].act, net[1].drop, net[1].weight
    convert_norm(net, "SyncBN")
    assert type(net[1]) is NormAct and type(net[1].norm) is SyncBatchNorm
    assert net[1].act is act and net[1].drop is drop and net[1].norm.weight is weight
    assert not net[1].training and not net[1].norm.training
    assert "1.norm.running_mean" in net.state_dict()
    torch.testing.assert_close(net(x), expected)
    convert_norm(net, "BN")  # converting again replaces the norm inside the NormAct
    assert type(net[1]) is NormAct and type(net[1].norm) is nn.BatchNorm2d and net[1].act is act
    torch.testing.assert_close(net(x), expected)
    convert_norm(net, "")
    assert type(net[1].norm) is nn.Identity and net[1].act is act


@pytest.mark.parametrize("layer,reason", [
    (_OwnForward(4), "defines its own forward"),
    (_BNReLU(4, act_first=True), "not normalization followed by drop then act"),
    (_WithAux(4), r"child modules \(aux\)"),
])
def test_layers_doing_more_are_refused_before_any_change(layer, reason):
    net = _net(layer)
    kinds = [type(m) for m in net.modules()]
    with pytest.raises(NotConvertibleError, match=rf"cannot replace 1 \(.*{type(layer).__qualname__}\): .*{reason}"):
        convert_norm(net, "MABN")
    assert [type(m) for m in net.modules()] == kinds  # nothing replaced, not even the plain net[3]
    with pytest.raises(NotConvertibleError, match=type(layer).__qualname__):
        convert_sync_batchnorm(net)
    convert_norm(net, "MABN", source=lambda m: type(m) is nn.BatchNorm2d)  # the documented way around
    assert type(net[3]) is MABN2d and type(net[1]) is type(layer)


def test_layer_with_forward_hook_is_refused():
    net = _net(nn.BatchNorm2d(4))
    net[1].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(NotConvertibleError, match="hooks"):
        convert_norm(net, "BN")


def test_package_norms_convert_as_before():
    net = nn.Sequential(MABN2d(4), BatchRenorm2d(4), GhostBatchNorm2d(4, B=2), SyncBatchNorm(4), FrozenBatchNorm2d(4))
    convert_norm(net, "BN")
    assert all(type(m) is nn.BatchNorm2d for m in net)
    net = nn.Sequential(MABN2d(4), BatchRenorm2d(4), GhostBatchNorm2d(4, B=2), SyncBatchNorm(4), nn.BatchNorm2d(4))
    convert_sync_batchnorm(net)
    assert [type(m) for m in net] == [MABN2d, BatchRenorm2d, GhostBatchNorm2d, SyncBatchNorm, SyncBatchNorm]


def test_skipped_updates_sums_every_counter():
    import mabn

    net = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNorm(4), nn.Sequential(SyncBatchNorm(4), nn.BatchNorm2d(4)))
    net.register_buffer("my_skipped_updates", torch.tensor(100))  # other names do not count
    assert mabn.skipped_updates(nn.Linear(2, 2)).shape == () and mabn.skipped_updates(nn.Linear(2, 2)).item() == 0
    net[1].skipped_updates.fill_(2)
    net[2][0].skipped_updates.fill_(3)
    total = mabn.skipped_updates(net)
    assert total.shape == () and total.dtype == torch.long and total.item() == 5
    total += 1  # a new tensor, not a view of a buffer
    assert net[1].skipped_updates.item() == 2


def test_bn_statistics_into_mabn_through_the_public_helper():
    """mabn_running_var is the second moment that convert_norm gives MABN; is_mabn finds MABN."""
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 0.25, 4.0]))
    model = convert_norm(torch.nn.Sequential(bn), "MABN")
    assert is_mabn(model[0]) and not is_mabn(bn)
    expected = torch.tensor([1.25, 1.25, 8.0])
    assert torch.equal(model[0].running_var, expected)
    assert torch.equal(mabn_running_var(bn.running_mean.view(1, 3, 1, 1), bn.running_var), expected)
