"""Tests for mabn.groups: group checks, per-group statistics and the grouped batch norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import OpCounter
from mabn import groups
from mabn.groups import (channel_moments, check_group_size, count_groups, group_batch_norm, group_statistics,
                         grouped_batch_norm, grouped_moments, grouped_view, two_pass_statistics)

F64 = torch.float64


def test_check_group_size():
    assert check_group_size(2) == 2 and check_group_size(None, allow_none=True) is None
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="B \\(the normalization batch size\\)"):
            check_group_size(bad)


def test_count_groups():
    assert count_groups("Layer", 2, 8) == 4 and count_groups("Layer", None, 7) == 1
    assert count_groups("Layer", 3, 0) == 0
    with pytest.raises(ValueError, match="Layer normalizes groups of B=3.*divisible by 3"):
        count_groups("Layer", 3, 8)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (6, 3, 4, 5)], ids=["NC", "NCL", "NCHW"])
def test_group_statistics_equal_per_group_biased_moments(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=F64) * 3 + 100  # |mean| >> std: the two-pass form stays exact
    mean, var = group_statistics(x, 3)
    assert mean.shape == var.shape == (3, 3)
    for g, part in enumerate(x.split(2)):
        dims = [0] + list(range(2, x.dim()))
        torch.testing.assert_close(mean[g], part.mean(dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var[g], part.var(dims, correction=0), rtol=1e-10, atol=1e-10)


def test_group_statistics_of_channels_last_input():
    x = torch.randn(4, 3, 5, 6, dtype=F64)
    for got, want in zip(group_statistics(x.to(memory_format=torch.channels_last), 2),
                         group_statistics(x, 2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_group_batch_norm_equals_batch_norm_per_group_forward_and_backward():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, dtype=F64, requires_grad=True)
    scale = torch.rand(3, 3, dtype=F64, requires_grad=True)  # per group and channel
    shift = torch.randn(3, 3, dtype=F64, requires_grad=True)
    mean, var = group_statistics(x, 3)
    y = group_batch_norm(x, mean, torch.rsqrt(var + 1e-5), scale, shift)
    ref = torch.cat([F.batch_norm(part, None, None, scale[g], shift[g], True, 0.0, 1e-5)
                     for g, part in enumerate(x.split(2))])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, scale, shift), upstream)
    want = torch.autograd.grad(ref, (x, scale, shift), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_group_batch_norm_gradcheck():
    torch.manual_seed(2)

    def f(x, scale, shift):
        mean, var = group_statistics(x, 2)
        return group_batch_norm(x, mean, torch.rsqrt(var + 1e-5), scale, shift)

    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    scale = (torch.rand(2, 2, dtype=F64) + 0.5).requires_grad_(True)
    shift = torch.randn(2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, scale, shift))


def _odd_layout(shape):
    """(N, C, H, W) whose spatial dims do not merge into one (memory order N, H, C, W)."""
    n, c, h, w = shape
    return torch.randn(n, h, c, w, dtype=F64).permute(0, 2, 1, 3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unmerged", "sliced"])
def test_grouped_view_is_the_channels_last_group_split(layout):
    x = torch.randn(6, 3, 4, 5, dtype=F64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "unmerged":
        x = _odd_layout((6, 3, 4, 5))
    elif layout == "sliced":
        x = torch.randn(6, 3, 4, 10, dtype=F64)[..., ::2]
    view = grouped_view(x, 3)
    assert view.shape == (3, 2, 20, 3)
    assert torch.equal(view, x.reshape(3, 2, 3, 20).transpose(2, 3))
    assert (view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == (layout != "unmerged")


@pytest.mark.parametrize("layout", ["channels_last", "unmerged"])
def test_group_batch_norm_on_other_layouts(layout):
    torch.manual_seed(3)
    base = torch.randn(6, 3, 4, 5, dtype=F64)
    other = (base.to(memory_format=torch.channels_last) if layout == "channels_last"
             else _odd_layout(base.shape))
    with torch.no_grad():
        other.copy_(base)
    scale = torch.rand(3, 3, dtype=F64) + 0.5
    shift = torch.randn(3, 3, dtype=F64)
    results = []
    for x in (base.clone().requires_grad_(True), other.requires_grad_(True)):
        mean, var = group_statistics(x, 3)
        y = group_batch_norm(x, mean, torch.rsqrt(var + 1e-5), scale, shift)
        y.sum().backward()  # an expanded upstream gradient (all strides 0)
        results.append((y, x.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_group_batch_norm_output_takes_in_place_ops():
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    mean, var = group_statistics(x, 2)
    scale, shift = torch.ones(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64)
    y = group_batch_norm(x, mean, torch.rsqrt(var + 1e-5), scale, shift)
    assert not y._is_view()
    torch.relu_(y).sum().backward()
    assert x.grad.shape == x.shape


def _grouped_case(seed: int):
    """(6, 3, 4) float64 input (three groups of two), its grouped view, statistics and deviations,
    and per-group r, d and per-channel weight, bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 4, generator=g, dtype=F64) * 2 + 1
    x_p = grouped_view(x, 3)
    mean, var, xmu = grouped_moments(x_p)
    r = torch.rand(3, 1, 1, 3, generator=g, dtype=F64) + 0.5
    d = torch.randn(3, 1, 1, 3, generator=g, dtype=F64)
    weight = torch.rand(3, generator=g, dtype=F64) + 0.5
    bias = torch.randn(3, generator=g, dtype=F64)
    return x, x_p, mean, xmu, torch.rsqrt(var + 1e-5), r, d, weight, bias


def test_grouped_batch_norm_takes_the_callers_powers_of_invstd():
    """``invstd3`` and ``weighted`` given by the caller give what is computed without them."""
    x, x_p, mean, xmu, invstd, r, d, weight, bias = _grouped_case(4)
    results = []
    for keywords in ({}, dict(invstd3=invstd ** 3), dict(weighted=(weight * invstd, weight * invstd ** 3))):
        x_in, w, b = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
        y = grouped_batch_norm(x_in, xmu, invstd, w, b, r, d, **keywords)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
        results.append((y, *torch.autograd.grad(y, (x_in, w, b), upstream)))
    expected = ((x_p - mean) * invstd * r + d) * weight + bias
    torch.testing.assert_close(grouped_view(results[0][0], 3), expected, rtol=1e-12, atol=1e-12)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grouped_batch_norm_normalizes_the_given_deviations():
    """The output is made from ``xmu`` as given (never recomputed from ``x``): deviations from
    other means shift the output by ``-shift * k``."""
    x, _, _, xmu, invstd, r, d, weight, bias = _grouped_case(7)
    shift = torch.randn(3, 1, 1, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    y = grouped_batch_norm(x, xmu, invstd, weight, bias, r, d)
    y_shifted = grouped_batch_norm(x, xmu - shift, invstd, weight, bias, r, d)
    torch.testing.assert_close(grouped_view(y - y_shifted, 3), (shift * invstd * r * weight).expand(xmu.shape),
                               rtol=1e-12, atol=1e-12)


def test_group_batch_norm_output_without_a_mergeable_layout(monkeypatch):
    """Where groups and samples of the result do not merge into one batch dim, the output is a
    copy in the input's layout (and the gradient a reshape): same values, still no view."""
    x, _, mean, _, invstd, r, d, weight, bias = _grouped_case(6)
    expected = []
    for unmergeable in (False, True):
        if unmergeable:
            monkeypatch.setattr(groups, "_ungrouped_strides", lambda t, shape: None)
        x_in = x.detach().clone().requires_grad_(True)
        y = group_batch_norm(x_in, mean.view(3, 3), invstd.view(3, 3), r.view(3, 3), d.view(3, 3))
        assert not y._is_view() and y.shape == x.shape
        grad, = torch.autograd.grad(y, x_in, torch.ones_like(y) * torch.arange(4, dtype=F64))
        expected.append((y, grad))
    for got, want in zip(expected[1], expected[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- where the statistics are computed: two passes on the CPU, var_mean elsewhere ---------------

def _dispatched(fn, *args) -> dict:
    """Ops per name of ``fn(*args)``, after one call (which builds the cached constants)."""
    fn(*args)
    with OpCounter() as counter:
        fn(*args)
    return dict(counter.by_op)


def test_two_pass_statistics_on_the_cpu_only():
    assert two_pass_statistics(torch.device("cpu"))
    for device in ("cuda", "meta", "mps", "xpu"):
        assert not two_pass_statistics(torch.device(device))


def test_cpu_statistics_take_two_passes_and_other_devices_var_mean():
    """On the CPU: a mean, the deviations, their squares and a sum per group, torch's batch-norm
    statistics for the whole batch, never var_mean; on another device (meta here) var_mean."""
    x = torch.randn(4, 3, 5)
    assert _dispatched(grouped_moments, grouped_view(x, 2)) == {"aten.mean": 1, "aten.sub": 1, "aten.addcmul": 1,
                                                                "aten.sum": 1}
    assert _dispatched(channel_moments, x) == {"aten.batch_norm_update_stats": 1}
    meta = torch.empty(4, 3, 5, device="meta")
    assert _dispatched(grouped_moments, grouped_view(meta, 2)) == {"aten.var_mean": 1, "aten.sub": 1}
    assert _dispatched(channel_moments, meta) == {"aten.var_mean": 1}


def _large_mean_input(shape, seed: int) -> torch.Tensor:
    """float32 values with mean 1e3 and std 1: ``E[x^2] - mean^2`` loses every digit of the
    variance there (the squares' rounding error is ~0.03), two passes lose none."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) + 1e3).float()


# a float32 sum of a few hundred squares rounds by up to ~1e-5 relative, by ~1e-6 typically, with an
# order that depends on the kernel's threads (1.4e-6 with one thread, 4e-7 with two, for the
# channels-last case below); E[x^2] - mean^2 errs by ~0.3 on these inputs
STATISTICS_RTOL = 1e-5


def _assert_relative(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    error = ((got.double() - want) / want).abs().max().item()
    assert error <= rtol, error


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("moments", [groups._two_pass_moments, groups._var_mean_moments],
                         ids=["two-pass (CPU)", "var_mean (other devices)"])
def test_grouped_moments_are_exact_for_a_large_mean(moments, correction):
    x_p = grouped_view(_large_mean_input((8, 16, 6, 7), seed=correction), 4)
    mean, var, xmu = moments(x_p, correction)
    reference = x_p.double()
    assert mean.shape == var.shape == (4, 1, 1, 16) and mean.dtype == var.dtype == torch.float32
    _assert_relative(mean, reference.mean(dim=(1, 2), keepdim=True), STATISTICS_RTOL)
    _assert_relative(var, reference.var(dim=(1, 2), correction=correction, keepdim=True), STATISTICS_RTOL)
    assert torch.equal(xmu, x_p - mean)


@pytest.mark.parametrize("layout", ["NC", "NCHW", "channels_last"])
@pytest.mark.parametrize("moments", [groups._two_pass_channel_moments, groups._var_mean_channel_moments],
                         ids=["two-pass (CPU)", "var_mean (other devices)"])
def test_channel_moments_are_exact_for_a_large_mean(moments, layout):
    x = _large_mean_input((64, 21) if layout == "NC" else (8, 16, 6, 7), seed=2)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    dims = [0, *range(2, x.dim())]
    mean, var = moments(x)
    assert mean.shape == var.shape == (x.shape[1],)
    _assert_relative(mean, x.double().mean(dims), STATISTICS_RTOL)
    _assert_relative(var, x.double().var(dims, correction=0), STATISTICS_RTOL)
