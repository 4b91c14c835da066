"""Tests for mabn.ghost_batchnorm (BatchNorm over groups of B consecutive samples)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.harness import OpCounter
from mabn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from norm_checks import (assert_half_input_matches_float32, assert_matches_per_group_copies,
                         assert_same_gradients_and_state, assert_same_step)
from op_counting import training_step_ops

F64 = torch.float64

# Dispatched aten ops per training forward + backward on the CPU at (N, 64, 7, 7), B = 2: four
# groups (two more than var_mean's 30 on a GPU: the two-pass statistics' mean and squares), and
# one group (nn.BatchNorm2d's kernels). Each is a kernel launch on a GPU; lower the numbers with
# every cut so that a regression fails.
OP_BUDGET_FOUR_GROUPS = 32
OP_BUDGET_ONE_GROUP = 15

CASES = [  # (ghost class, torch class, input shape)
    (GhostBatchNorm1d, nn.BatchNorm1d, (12, 5)),
    (GhostBatchNorm1d, nn.BatchNorm1d, (12, 5, 4)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (12, 5, 3, 4)),
    (GhostBatchNorm3d, nn.BatchNorm3d, (12, 5, 2, 3, 2)),
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d", "3d"]


def _bn_state(m: nn.Module) -> dict:
    """The state dict without ``skipped_updates``: what a plain BatchNorm loads strictly."""
    return {k: v for k, v in m.state_dict().items() if k != "skipped_updates"}


def _random_affine(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def _random_stats(m: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=F64))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=F64) + 0.5)


def _input(shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    # Per-sample offsets and scales make the groups' statistics clearly different.
    shift = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=g, dtype=dtype) * 3
    scale = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g, dtype=dtype) * 4 + 0.5
    return torch.randn(shape, generator=g, dtype=dtype) * scale + shift


def test_is_batchnorm_with_batchnorm_state():
    m = GhostBatchNorm2d(4, B=2)
    assert isinstance(m, nn.BatchNorm2d) and isinstance(m, _BatchNorm)
    assert isinstance(GhostBatchNorm1d(4, 2), nn.BatchNorm1d)
    assert isinstance(GhostBatchNorm3d(4, 2), nn.BatchNorm3d)
    assert list(m.state_dict()) == list(nn.BatchNorm2d(4).state_dict()) + ["skipped_updates"]
    assert m.skipped_updates.dtype == torch.long and m.skipped_updates.dim() == 0
    assert m.B == 2 and m.momentum == 0.1 and m.eps == 1e-5 and m.track_running_stats
    assert "B=2" in repr(m)
    from mabn.convert import is_batch_norm
    assert is_batch_norm(m)


@pytest.mark.parametrize("ghost_cls,bn_cls,shape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("B", [2, 3, 4])
def test_equals_batchnorm_applied_group_by_group(ghost_cls, bn_cls, shape, B):
    ghost = ghost_cls(5, B, momentum=0.3, dtype=F64)
    _random_affine(ghost)
    _random_stats(ghost)
    ref = bn_cls(5, momentum=0.3, dtype=F64)
    ref.load_state_dict(_bn_state(ghost))

    # One BatchNorm copy per group, each from the same starting state.
    refs = [copy.deepcopy(ref) for _ in range(shape[0] // B)]
    assert_matches_per_group_copies(ghost, refs, _input(shape), B)

    # The update is linear in the batch statistics: averaging over groups commutes with it.
    for name in ("running_mean", "running_var"):
        ref_stat = torch.stack([getattr(r, name) for r in refs]).mean(0)
        torch.testing.assert_close(getattr(ghost, name), ref_stat, rtol=1e-12, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 1


def test_groups_are_consecutive_samples_in_order():
    ghost = GhostBatchNorm2d(2, B=2, affine=False, dtype=F64)
    x = _input((6, 2, 3, 3))
    perm = torch.tensor([1, 0, 3, 2, 5, 4])  # shuffling inside groups commutes with the layer
    torch.testing.assert_close(ghost(x)[perm], ghost(x[perm]), rtol=1e-12, atol=1e-12)
    other = torch.tensor([2, 1, 0, 3, 4, 5])  # mixing groups does not
    assert not torch.allclose(ghost(x)[other], ghost(x[other]))
    for i in range(3):
        group = x[2 * i:2 * i + 2]
        exp = (group - group.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            group.var((0, 2, 3), unbiased=False, keepdim=True) + ghost.eps)
        torch.testing.assert_close(ghost(x)[2 * i:2 * i + 2], exp, rtol=1e-12, atol=1e-12)


def test_running_stats_follow_the_average_rule_over_steps():
    ghost = GhostBatchNorm2d(3, B=4, momentum=0.2, dtype=F64)
    rm, rv = ghost.running_mean.clone(), ghost.running_var.clone()
    for step in range(3):
        x = _input((12, 3, 2, 5), seed=step)
        ghost(x)
        groups = x.view(3, 4, 3, 10)
        mean = groups.mean((1, 3)).mean(0)
        var = groups.var((1, 3), unbiased=True).mean(0)
        rm = 0.8 * rm + 0.2 * mean
        rv = 0.8 * rv + 0.2 * var
        torch.testing.assert_close(ghost.running_mean, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ghost.running_var, rv, rtol=1e-12, atol=1e-12)
        assert ghost.num_batches_tracked.item() == step + 1


def test_momentum_none_is_cumulative_average():
    ghost = GhostBatchNorm1d(3, B=2, momentum=None, dtype=F64)
    means, variances = [], []
    for step in range(4):
        x = _input((8, 3, 5), seed=step)
        ghost(x)
        groups = x.view(4, 2, 3, 5)
        means.append(groups.mean((1, 3)).mean(0))
        variances.append(groups.var((1, 3), unbiased=True).mean(0))
    torch.testing.assert_close(ghost.running_mean, torch.stack(means).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, torch.stack(variances).mean(0), rtol=1e-12,
                               atol=1e-12)
    assert ghost.num_batches_tracked.item() == 4


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ghost_cls,bn_cls,shape", CASES, ids=CASE_IDS)
def test_whole_batch_group_equals_batchnorm_exactly(ghost_cls, bn_cls, shape, momentum):
    torch.manual_seed(0)
    ghost = ghost_cls(5, B=shape[0], momentum=momentum)
    bn = bn_cls(5, momentum=momentum)
    _random_affine(ghost)
    bn.load_state_dict(_bn_state(ghost))
    for step in range(3):
        x = _input(shape, seed=step, dtype=torch.float32)
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        y1, y2 = ghost(x1), bn(x2)
        assert torch.equal(y1, y2)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(ghost.weight.grad, bn.weight.grad)
    assert torch.equal(ghost.bias.grad, bn.bias.grad)
    for k, v in bn.state_dict().items():
        assert torch.equal(ghost.state_dict()[k], v), k


def test_eval_is_batchnorm_with_running_stats():
    torch.manual_seed(1)
    ghost = GhostBatchNorm2d(4, B=2)
    _random_affine(ghost)
    for step in range(3):
        ghost(_input((8, 4, 3, 3), seed=step, dtype=torch.float32))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(_bn_state(ghost))
    ghost.eval()
    bn.eval()
    before = {k: v.clone() for k, v in ghost.state_dict().items()}
    for n in (1, 3, 8):  # any batch size in eval, divisible by B or not
        x = torch.randn(n, 4, 3, 3)
        assert torch.equal(ghost(x), bn(x))
    for k, v in ghost.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors():
    m = GhostBatchNorm2d(3, B=4)
    with pytest.raises(ValueError, match=r"groups of B=4 .* batch has 6 samples.*divisible by 4"):
        m(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match=r"batch has 2 samples"):
        m(torch.randn(2, 3, 2, 2))
    assert m.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        GhostBatchNorm1d(3, B=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"expected 3 channels"):
        m(torch.randn(8, 5, 2, 2))
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match="positive int"):
            GhostBatchNorm2d(3, B=bad)
    with pytest.raises(TypeError):
        GhostBatchNorm2d(3)  # B is required


def test_state_dict_loads_into_batchnorm_and_back():
    torch.manual_seed(2)
    ghost = GhostBatchNorm2d(4, B=2)
    _random_affine(ghost)
    for step in range(2):
        ghost(_input((6, 4, 3, 3), seed=step, dtype=torch.float32))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(_bn_state(ghost))  # strict
    for k, v in _bn_state(ghost).items():
        assert torch.equal(bn.state_dict()[k], v), k
    assert bn.num_batches_tracked.item() == 2

    back = GhostBatchNorm2d(4, B=3)
    back.skipped_updates.fill_(5)
    back.load_state_dict(bn.state_dict())  # strict, without skipped_updates
    for k, v in bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.skipped_updates.item() == 0
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(back.eval()(x), bn.eval()(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_statistics_in_float32(dtype):
    torch.manual_seed(3)
    m = GhostBatchNorm2d(3, B=2)
    ref = GhostBatchNorm2d(3, B=2)
    assert_half_input_matches_float32(m, ref, (torch.randn(6, 3, 5, 5) * 100 + 300).to(dtype))


def test_channels_last_matches_contiguous():
    torch.manual_seed(4)
    m = GhostBatchNorm2d(3, B=2, dtype=F64)
    ref = copy.deepcopy(m)
    x = _input((4, 3, 4, 5))
    y = m(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_without_affine_or_running_stats():
    x = _input((6, 3, 2, 2))
    groups = [nn.functional.batch_norm(g, None, None, training=True) for g in x.split(3)]
    exp = torch.cat(groups)
    m = GhostBatchNorm2d(3, B=3, affine=False, dtype=F64)
    assert m.weight is None
    torch.testing.assert_close(m(x), exp, rtol=1e-12, atol=1e-12)
    untracked = GhostBatchNorm2d(3, B=3, affine=False, track_running_stats=False, dtype=F64)
    assert untracked.running_mean is None and untracked.num_batches_tracked is None
    torch.testing.assert_close(untracked(x), exp, rtol=1e-12, atol=1e-12)
    # Like torch's BatchNorm, without running statistics eval also uses batch (group) statistics.
    torch.testing.assert_close(untracked.eval()(x), exp, rtol=1e-12, atol=1e-12)


def test_bias_false_keyword():
    m = GhostBatchNorm2d(3, B=2, bias=False, dtype=F64)
    assert m.bias is None and m.weight is not None
    x = _input((4, 3, 2, 2))
    with torch.no_grad():
        m.weight.fill_(2.0)
    exp = 2.0 * torch.cat([nn.functional.batch_norm(g, None, None, training=True)
                           for g in x.split(2)])
    torch.testing.assert_close(m(x), exp, rtol=1e-12, atol=1e-12)


def test_training_forward_has_no_host_sync():
    """On the meta device any ``.item()`` / data-dependent Python branch raises."""
    for momentum in (0.1, None):
        m = GhostBatchNorm2d(3, B=2, momentum=momentum, device="meta")
        y = m(torch.randn(8, 3, 2, 2, device="meta"))
        assert y.shape == (8, 3, 2, 2) and y.device.type == "meta"


def test_conv_bn_folding_and_sync_conversion():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3).eval()
    ghost = GhostBatchNorm2d(4, B=2)
    _random_affine(ghost)
    ghost(torch.randn(4, 4, 3, 3) + 2)
    ghost.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, ghost)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), ghost(conv(x)), rtol=1e-5, atol=1e-5)

    net = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(ghost))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert type(synced[1]) is nn.SyncBatchNorm
    for k, v in _bn_state(net[1]).items():
        assert torch.equal(synced[1].state_dict()[k], v), k
    from mabn import convert_sync_batchnorm
    kept = convert_sync_batchnorm(copy.deepcopy(net))  # BN subclasses with own semantics stay
    assert type(kept[1]) is GhostBatchNorm2d and kept[1].B == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_matches_eager(momentum):
    torch._dynamo.reset()
    torch.manual_seed(6)
    eager = GhostBatchNorm2d(3, B=2, momentum=momentum, dtype=F64)
    _random_affine(eager)
    module = copy.deepcopy(eager)
    # the partitioning backend recomputes cheap values in the backward, as inductor does
    compiled = torch.compile(module, backend="aot_eager_decomp_partition", fullgraph=True)
    for step in range(3):
        assert_same_step(compiled, eager, _input((8, 3, 4, 4), seed=step))
    assert_same_gradients_and_state(module, eager)
    assert module.num_batches_tracked.item() == 3


@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (6, 3)], ids=["2d", "NC"])
def test_gradcheck_grouped_forward(shape):
    """The hand-written group backward against finite differences (float64, fresh buffers)."""
    torch.manual_seed(7)
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    m = cls(3, B=2, dtype=F64)
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def f(x, weight, bias):
        buffers = {k: v.clone() for k, v in state.items() if k != "skipped_updates"}
        return torch.func.functional_call(m, {"weight": weight, "bias": bias, **buffers}, (x,))

    x = _input(shape).requires_grad_(True)
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("batch,budget", [(8, OP_BUDGET_FOUR_GROUPS), (2, OP_BUDGET_ONE_GROUP)])
def test_training_step_dispatches_few_aten_ops(batch, budget):
    count = training_step_ops(GhostBatchNorm2d(64, B=2), batch)
    assert count <= budget, count


def test_cpu_training_step_takes_the_two_pass_statistics():
    """On the CPU the groups' statistics are a mean and a sum of squares, not var_mean."""
    m, x = GhostBatchNorm2d(4, B=2), torch.randn(8, 4, 3, 3, requires_grad=True)
    with OpCounter() as counter:
        m(x).sum().backward()
    assert counter.by_op["aten.var_mean"] == 0 and counter.by_op["aten.mean"] >= 1
