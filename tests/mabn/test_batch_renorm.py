"""Tests for mabn.batch_renorm (Batch Renormalization, Ioffe 2017)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from benchmarks.harness import OpCounter
from mabn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from norm_checks import (assert_half_input_matches_float32, assert_matches_per_group_copies,
                         assert_same_gradients_and_state, assert_same_step)
from op_counting import training_step_ops

F64 = torch.float64

# Dispatched aten ops per training forward + backward on the CPU at (8, 64, 7, 7): groups of B = 2
# (four groups; two more than var_mean's 38 on a GPU: the two-pass statistics' mean and squares),
# and the whole batch (B = None, one group: torch's batch-norm kernels). Each is a kernel launch on
# a GPU; lower the numbers with every cut so that a regression fails.
OP_BUDGET = {2: 40, None: 25}


def _view(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v.view((1, -1) + (1,) * (dim - 2))


def reference_train(x, running_mean, running_var, weight, bias, eps, rmax, dmax):
    """Float64 Batch Renorm training output from the paper's formula; also returns raw r, d."""
    dims = [0, *range(2, x.dim())]
    mu = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(running_var + eps)
    r_raw = (sigma_b / sigma).detach()
    d_raw = ((mu - running_mean) / sigma).detach()
    r = r_raw.clamp(1.0 / rmax, rmax)
    d = d_raw.clamp(-dmax, dmax)
    xhat = (x - _view(mu, x.dim())) / _view(sigma_b, x.dim())
    y = _view(weight, x.dim()) * (xhat * _view(r, x.dim()) + _view(d, x.dim())) \
        + _view(bias, x.dim())
    return y, r_raw, d_raw


def reference_limits(t, warmup, r_end, d_end, r_max, d_max):
    def ramp(end):
        if end == warmup:
            return 1.0 if t >= warmup else 0.0
        return min(max((t - warmup) / (end - warmup), 0.0), 1.0)
    return 1.0 + (r_max - 1.0) * ramp(r_end), d_max * ramp(d_end)


def _random_affine(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=F64) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=F64))


def test_is_batchnorm_subclass_with_batchnorm_state():
    m = BatchRenorm2d(4)
    assert isinstance(m, _BatchNorm)
    assert set(m.state_dict()) == set(nn.BatchNorm2d(4).state_dict()) | {"skipped_updates"}
    assert m.skipped_updates.dtype == torch.long and m.skipped_updates.dim() == 0
    assert m.momentum == 0.01 and m.track_running_stats
    assert "r_max=3.0" in repr(m)


def test_forward_matches_reference_with_active_clipping():
    torch.manual_seed(0)
    m = BatchRenorm2d(6, momentum=0.1, r_max=3.0, d_max=5.0, warmup_steps=2,
                      r_ramp_end=10, d_ramp_end=10, dtype=F64)
    _random_affine(m)
    # Channels 0-2: running stats far from the batch (clipped); 3-5: close (not clipped).
    rm = torch.tensor([30.0, -300.0, 0.0, 0.1, -0.1, 0.0], dtype=F64)
    rv = torch.tensor([1e-3, 1e3, 1e3, 1.2, 0.8, 1.0], dtype=F64)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
        m.num_batches_tracked.fill_(6)  # rmax = 1 + 2 * 4/8 = 2, dmax = 5 * 4/8 = 2.5
    rmax, dmax = m.current_limits()
    assert rmax.item() == pytest.approx(2.0) and dmax.item() == pytest.approx(2.5)

    x = torch.randn(8, 6, 3, 3, dtype=F64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = m.weight.detach().clone().requires_grad_(True)
    b_ref = m.bias.detach().clone().requires_grad_(True)
    y_ref, r_raw, d_raw = reference_train(x_ref, rm, rv, w_ref, b_ref, m.eps, 2.0, 2.5)
    r_clipped = (r_raw < 0.5) | (r_raw > 2.0)
    d_clipped = d_raw.abs() > 2.5
    assert r_clipped[:3].all() and d_clipped[:2].all()
    assert not r_clipped[3:].any() and not d_clipped[3:].any()

    y = m(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, w_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, b_ref.grad, rtol=1e-10, atol=1e-12)
    assert m.num_batches_tracked.item() == 7


@pytest.mark.parametrize("saturated", [True, False], ids=["clipped", "warmup"])
def test_gradcheck_training_forward(saturated):
    """gradcheck on a pure function: running state reseeded every call, r and d constant.

    r and d carry no gradient, so the finite differences only match when they are locally
    constant in x: either clipped at their limits, or r = 1, d = 0 during warmup.
    """
    torch.manual_seed(1)
    if saturated:
        m = BatchRenorm2d(3, r_max=2.0, d_max=0.5, warmup_steps=0, r_ramp_end=0,
                          d_ramp_end=0, dtype=F64)
        state = {"running_mean": torch.tensor([100.0, -100.0, 100.0], dtype=F64),
                 "running_var": torch.tensor([1e4, 1e-4, 1e4], dtype=F64)}
    else:
        m = BatchRenorm2d(3, warmup_steps=100, dtype=F64)
        state = {"running_mean": torch.tensor([1.0, -2.0, 0.5], dtype=F64),
                 "running_var": torch.tensor([4.0, 0.25, 1.0], dtype=F64)}
    state["num_batches_tracked"] = torch.tensor(3)

    def f(x, weight, bias):
        buffers = {k: v.clone() for k, v in state.items()}
        return functional_call(m, {"weight": weight, "bias": bias, **buffers}, (x,))

    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert m.num_batches_tracked.item() == 0  # the module's own state was never touched


def test_schedule_matches_linear_formula():
    kw = dict(r_max=3.0, d_max=5.0, warmup_steps=10, r_ramp_end=30, d_ramp_end=20)
    m = BatchRenorm2d(2, **kw)
    for t in [0, 5, 9, 10, 11, 15, 20, 25, 29, 30, 31, 1000]:
        m.num_batches_tracked.fill_(t)
        rmax, dmax = m.current_limits()
        exp_r, exp_d = reference_limits(t, 10, 30, 20, 3.0, 5.0)
        assert rmax.item() == pytest.approx(exp_r, abs=1e-6), t
        assert dmax.item() == pytest.approx(exp_d, abs=1e-6), t
    m.num_batches_tracked.fill_(20)
    assert tuple(v.item() for v in m.current_limits()) == pytest.approx((2.0, 5.0))


def test_schedule_without_ramp_jumps_at_warmup():
    m = BatchRenorm2d(2, r_max=4.0, d_max=2.0, warmup_steps=3, r_ramp_end=3, d_ramp_end=3)
    values = []
    for t in range(6):
        m.num_batches_tracked.fill_(t)
        values.append(tuple(v.item() for v in m.current_limits()))
    assert values == [(1.0, 0.0)] * 3 + [(4.0, 2.0)] * 3


def test_warmup_equals_batchnorm_train():
    torch.manual_seed(2)
    brn = BatchRenorm2d(4, momentum=0.1, warmup_steps=5, r_ramp_end=10, d_ramp_end=10,
                        dtype=F64)
    bn = nn.BatchNorm2d(4, momentum=0.1, dtype=F64)
    _random_affine(brn)
    bn.load_state_dict({k: v for k, v in brn.state_dict().items() if k != "skipped_updates"})
    with torch.no_grad():  # running stats far from the batch stats: r, d would clip if allowed
        for m in (brn, bn):
            m.running_mean.fill_(50.0)
            m.running_var.fill_(1e-3)
    for step in range(5):
        x = torch.randn(6, 4, 3, 3, dtype=F64) * 3 + 1
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        assert brn.current_limits()[0].item() == 1.0 and brn.current_limits()[1].item() == 0.0
        y1, y2 = brn(x1), bn(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad)
    assert brn.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5


def test_counter_advances_and_limits_change_across_forwards():
    m = BatchRenorm2d(3, r_max=3.0, d_max=4.0, warmup_steps=2, r_ramp_end=6, d_ramp_end=4)
    seen = []
    for step in range(8):
        assert m.num_batches_tracked.item() == step
        seen.append(tuple(v.item() for v in m.current_limits()))
        m(torch.randn(4, 3, 2, 2))
    assert m.num_batches_tracked.item() == 8
    expected = [reference_limits(t, 2, 6, 4, 3.0, 4.0) for t in range(8)]
    assert seen == [pytest.approx(e) for e in expected]
    assert seen[2] == (1.0, 0.0) and seen[3][0] > 1.0 and seen[3][1] > 0.0
    assert seen[6] == pytest.approx((3.0, 4.0))


def test_running_stats_update_formula():
    torch.manual_seed(3)
    m = BatchRenorm2d(3, momentum=0.2, warmup_steps=0, dtype=F64)
    rm = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    rv = torch.tensor([0.5, 2.0, 9.0], dtype=F64)
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    x = torch.randn(5, 3, 4, 2, dtype=F64)
    m(x)
    mu = x.mean([0, 2, 3])
    std_unbiased = x.var([0, 2, 3], unbiased=True).sqrt()
    exp_mean = rm + 0.2 * (mu - rm)
    exp_var = (rv.sqrt() + 0.2 * (std_unbiased - rv.sqrt())) ** 2
    torch.testing.assert_close(m.running_mean, exp_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, exp_var, rtol=1e-12, atol=1e-12)


def test_momentum_one_gives_batch_unbiased_stats():
    x = torch.randn(7, 3, 5, dtype=F64)
    m = BatchRenorm1d(3, momentum=1.0, dtype=F64)
    m(x)
    torch.testing.assert_close(m.running_mean, x.mean([0, 2]))
    torch.testing.assert_close(m.running_var, x.var([0, 2], unbiased=True))


def test_eval_uses_running_stats_and_leaves_state():
    torch.manual_seed(4)
    m = BatchRenorm2d(3, dtype=F64)
    _random_affine(m)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.0], dtype=F64))
        m.running_var.copy_(torch.tensor([4.0, 0.5, 2.0], dtype=F64))
        m.num_batches_tracked.fill_(17)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    y = m(x)
    exp = (x - _view(m.running_mean, 4)) / _view(torch.sqrt(m.running_var + m.eps), 4) \
        * _view(m.weight, 4) + _view(m.bias, 4)
    torch.testing.assert_close(y, exp, rtol=1e-12, atol=1e-12)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unclipped_training_output_equals_eval_output():
    torch.manual_seed(5)
    m = BatchRenorm2d(3, r_max=1e3, d_max=1e3, warmup_steps=0, r_ramp_end=0, d_ramp_end=0,
                      dtype=F64)
    _random_affine(m)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([3.0, -1.0, 0.2], dtype=F64))
        m.running_var.copy_(torch.tensor([9.0, 0.1, 1.5], dtype=F64))
    x = torch.randn(4, 3, 3, 3, dtype=F64)
    y_eval = m.eval()(x)
    y_train = m.train()(x)
    torch.testing.assert_close(y_train, y_eval, rtol=1e-10, atol=1e-10)


def test_state_dict_round_trip_and_batchnorm_load():
    torch.manual_seed(6)
    src = BatchRenorm2d(4, warmup_steps=0)
    for _ in range(3):
        src(torch.randn(4, 4, 3, 3))
    dst = BatchRenorm2d(4)
    dst.load_state_dict(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert dst.num_batches_tracked.item() == 3

    bn = nn.BatchNorm2d(4)
    _random_affine(bn, seed=7)
    bn.train()
    for _ in range(2):
        bn(torch.randn(4, 4, 3, 3) + 1)
    brn = BatchRenorm2d(4)
    brn.load_state_dict(bn.state_dict())
    bn.eval()
    brn.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(brn(x), bn(x))
    assert brn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 7)], ids=["NC", "NCL"])
def test_1d_matches_reference(shape):
    torch.manual_seed(7)
    m = BatchRenorm1d(5, r_max=1.5, d_max=0.3, warmup_steps=0, r_ramp_end=0, d_ramp_end=0,
                      dtype=F64)
    _random_affine(m)
    with torch.no_grad():
        m.running_mean.copy_(torch.linspace(-1, 1, 5, dtype=F64))
        m.running_var.copy_(torch.linspace(0.2, 3, 5, dtype=F64))
    x = torch.randn(*shape, dtype=F64)
    exp, _, _ = reference_train(x, m.running_mean.clone(), m.running_var.clone(), m.weight,
                                m.bias, m.eps, 1.5, 0.3)
    torch.testing.assert_close(m(x), exp, rtol=1e-12, atol=1e-12)


def test_3d_matches_reference():
    torch.manual_seed(8)
    m = BatchRenorm3d(3, r_max=2.0, d_max=1.0, warmup_steps=0, r_ramp_end=0, d_ramp_end=0,
                      affine=False, dtype=F64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([2.0, 0.0, -0.5], dtype=F64))
        m.running_var.copy_(torch.tensor([0.1, 1.0, 5.0], dtype=F64))
    x = torch.randn(2, 3, 2, 3, 2, dtype=F64)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    exp, _, _ = reference_train(x, m.running_mean.clone(), m.running_var.clone(), ones, zeros,
                                m.eps, 2.0, 1.0)
    torch.testing.assert_close(m(x), exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,bad_shape,expected", [
    (BatchRenorm1d, (2, 3, 4, 4), "BatchRenorm1d expects 2-D or 3-D input"),
    (BatchRenorm2d, (2, 3, 4), "BatchRenorm2d expects 4-D input"),
    (BatchRenorm3d, (2, 3, 4, 4), "BatchRenorm3d expects 5-D input"),
])
def test_bad_dimensionality(cls, bad_shape, expected):
    with pytest.raises(ValueError, match=r"expects .*input \(N, C, \.\.\.\), got shape") as info:
        cls(3)(torch.randn(*bad_shape))
    assert expected in str(info.value) and str(bad_shape) in str(info.value)


def test_channel_mismatch_and_single_value_errors():
    m = BatchRenorm2d(3)
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\) got an input with 4 channels"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))
    assert m.num_batches_tracked.item() == 0
    m.eval()(torch.randn(1, 3, 1, 1))  # fine in eval


@pytest.mark.parametrize("kwargs", [
    dict(momentum=None), dict(momentum=0.0), dict(momentum=1.5), dict(r_max=0.5),
    dict(d_max=-1.0), dict(warmup_steps=-1), dict(warmup_steps=10, r_ramp_end=5),
    dict(warmup_steps=10, d_ramp_end=5),
])
def test_bad_constructor_args(kwargs):
    with pytest.raises(ValueError):
        BatchRenorm2d(3, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_statistics_in_float32(dtype):
    torch.manual_seed(9)
    m = BatchRenorm2d(3, warmup_steps=0, r_ramp_end=0, d_ramp_end=0)
    ref = BatchRenorm2d(3, warmup_steps=0, r_ramp_end=0, d_ramp_end=0)
    assert_half_input_matches_float32(m, ref, (torch.randn(4, 3, 5, 5) * 100 + 300).to(dtype))


def test_autocast_bf16_no_nan():
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchRenorm2d(4, warmup_steps=1,
                                                                     r_ramp_end=2,
                                                                     d_ramp_end=2))
    x = torch.randn(4, 3, 8, 8) * 50
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        y.float().square().mean().backward()
    brn = net[1]
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert torch.isfinite(brn.running_mean).all() and torch.isfinite(brn.running_var).all()
    net.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(net(x)).all()


@pytest.mark.parametrize("B", [None, 2])
def test_torch_compile_matches_eager_across_warmup_without_recompiles(B):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(11)
    kw = dict(momentum=0.3, warmup_steps=2, r_ramp_end=5, d_ramp_end=4, B=B, dtype=F64)
    eager = BatchRenorm2d(3, **kw)
    _random_affine(eager)
    with torch.no_grad():
        eager.running_mean.fill_(2.0)
        eager.running_var.fill_(0.05)
    compiled_module = BatchRenorm2d(3, **kw)
    compiled_module.load_state_dict(eager.state_dict())
    # the partitioning backend recomputes cheap values in the backward, as inductor does
    counter = CompileCounterWithBackend("aot_eager_decomp_partition")
    compiled = torch.compile(compiled_module, backend=counter, fullgraph=True)

    limits = []
    for _ in range(7):
        limits.append(tuple(v.item() for v in compiled_module.current_limits()))
        assert_same_step(compiled, eager, torch.randn(4, 3, 3, 3, dtype=F64))
        assert_same_gradients_and_state(compiled_module, eager)
    assert counter.frame_count == 1
    assert compiled_module.num_batches_tracked.item() == 7
    assert limits[0] == (1.0, 0.0) and limits[5] == pytest.approx((3.0, 5.0))
    assert len(set(limits)) > 3  # the schedule advanced inside the compiled graph


@pytest.mark.parametrize("B", [None, 2])
def test_training_forward_has_no_host_sync(B):
    """On the meta device any ``.item()`` / data-dependent Python branch raises."""
    m = BatchRenorm2d(3, warmup_steps=2, r_ramp_end=5, d_ramp_end=4, B=B, device="meta")
    y = m(torch.randn(4, 3, 2, 2, device="meta"))
    assert y.shape == (4, 3, 2, 2) and y.device.type == "meta"
    rmax, dmax = m.current_limits()
    assert rmax.device.type == "meta" and dmax.device.type == "meta"


# --- Normalization batch B: groups of B consecutive samples --------------------------------------

GROUP_CASES = [  # (class, input shape)
    (BatchRenorm1d, (12, 4)),
    (BatchRenorm1d, (12, 4, 3)),
    (BatchRenorm2d, (12, 4, 3, 2)),
    (BatchRenorm3d, (12, 4, 2, 2, 3)),
]


def _grouped_input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    per_sample = (shape[0],) + (1,) * (len(shape) - 1)
    shift = torch.randn(per_sample, generator=g, dtype=F64) * 2
    scale = torch.rand(per_sample, generator=g, dtype=F64) * 3 + 0.3
    return torch.randn(shape, generator=g, dtype=F64) * scale + shift


@pytest.mark.parametrize("cls,shape", GROUP_CASES, ids=["1d-NC", "1d-NCL", "2d", "3d"])
@pytest.mark.parametrize("B", [2, 3, 6])
def test_groups_equal_batch_renorm_applied_to_each_group(cls, shape, B):
    """Per group: own mu_B, sigma_B, r, d against the shared starting running statistics."""
    kw = dict(momentum=0.2, r_max=1.5, d_max=0.4, warmup_steps=0, r_ramp_end=0, d_ramp_end=0,
              dtype=F64)
    m = cls(4, B=B, **kw)
    _random_affine(m)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.5, -0.5, 0.0, 2.0], dtype=F64))
        m.running_var.copy_(torch.tensor([0.3, 2.0, 1.0, 8.0], dtype=F64))
        m.num_batches_tracked.fill_(4)
    ref = cls(4, **kw)  # B=None: the whole input is one group
    ref.load_state_dict(m.state_dict())
    refs = [copy.deepcopy(ref) for _ in range(shape[0] // B)]

    x = _grouped_input(shape, seed=B)
    y = assert_matches_per_group_copies(m, refs, x, B)
    if B < shape[0]:  # the groups really differ from whole-batch renorm
        assert not torch.allclose(y, copy.deepcopy(ref)(x))

    # Once per forward, with the average over groups of the means and of the stds.
    mean = torch.stack([r.running_mean for r in refs]).mean(0)
    std = torch.stack([r.running_var.sqrt() for r in refs]).mean(0)
    torch.testing.assert_close(m.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, std.square(), rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 5


def test_group_running_stats_formula_and_counter():
    m = BatchRenorm2d(3, momentum=0.3, B=2, warmup_steps=0, dtype=F64)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for step in range(3):
        x = _grouped_input((6, 3, 2, 2), seed=step)
        m(x)
        groups = x.view(3, 2, 3, 4)
        mu = groups.mean((1, 3)).mean(0)
        sd = groups.var((1, 3), unbiased=True).sqrt().mean(0)
        rm = rm + 0.3 * (mu - rm)
        rv = (rv.sqrt() + 0.3 * (sd - rv.sqrt())) ** 2
        torch.testing.assert_close(m.running_mean, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, rv, rtol=1e-12, atol=1e-12)
        assert m.num_batches_tracked.item() == step + 1


def test_whole_batch_group_equals_default():
    kw = dict(momentum=0.3, r_max=1.5, d_max=0.4, warmup_steps=0, r_ramp_end=0, d_ramp_end=0,
              dtype=F64)
    whole = BatchRenorm2d(3, **kw)
    grouped = BatchRenorm2d(3, B=6, **kw)
    assert whole.B is None and grouped.B == 6
    for step in range(3):
        x = _grouped_input((6, 3, 3, 3), seed=step)
        torch.testing.assert_close(grouped(x), whole(x), rtol=1e-12, atol=1e-12)
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[k], v, rtol=1e-12, atol=1e-12)


def test_group_eval_is_unchanged_and_any_batch_size():
    m = BatchRenorm2d(3, B=4)
    m(torch.randn(8, 3, 2, 2))
    ref = BatchRenorm2d(3)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 3, 2, 2)  # not divisible by B: fine in eval
    assert torch.equal(m.eval()(x), ref.eval()(x))


def test_group_errors_and_repr():
    m = BatchRenorm2d(3, B=4)
    assert "B=4" in repr(m) and "B=" not in repr(BatchRenorm2d(3))
    with pytest.raises(ValueError, match=r"B=4 .* batch has 6 samples.*divisible by 4"):
        m(torch.randn(6, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3, B=1)(torch.randn(4, 3))
    assert m.num_batches_tracked.item() == 0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="B"):
            BatchRenorm2d(3, B=bad)
    with pytest.raises(TypeError):
        BatchRenorm2d(3, 1e-5, 0.01, True, 2)  # B is keyword-only


@pytest.mark.parametrize("B", [2, None])
def test_training_step_dispatches_few_aten_ops(B):
    count = training_step_ops(BatchRenorm2d(64, B=B), 8)
    assert count <= OP_BUDGET[B], count


@pytest.mark.parametrize("B,statistics", [(2, "aten.mean"), (None, "aten.batch_norm_update_stats")])
def test_cpu_training_step_takes_the_two_pass_statistics(B, statistics):
    """On the CPU the statistics are two passes (a mean and a sum of squares per group, torch's
    batch-norm statistics for the whole batch), not var_mean."""
    m, x = BatchRenorm2d(4, B=B), torch.randn(8, 4, 3, 3, requires_grad=True)
    with OpCounter() as counter:
        m(x).sum().backward()
    assert counter.by_op["aten.var_mean"] == 0 and counter.by_op[statistics] >= 1
