"""The measuring tools count and time what they claim to."""
import pytest
import torch
from torch import nn

from benchmarks.harness import Case, OpCounter, compiled_kernel_count, count_ops, interleaved_times, saved_bytes, summarize


def test_interleaved_rounds_rotate_and_skip_warmup():
    calls = []
    cases = {name: Case(run=lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(cases, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab" "abc")
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_prepare_runs_before_every_call():
    order = []
    case = Case(run=lambda: order.append("run"), prepare=lambda: order.append("prepare"))
    interleaved_times({"only": case}, rounds=2, warmup=1, device=torch.device("cpu"))
    assert order == ["prepare", "run"] * 3


def test_summarize_median_and_spread():
    summary = summarize([0.001, 0.002, 0.003])
    assert summary["median_ms"] == pytest.approx(2.0)
    assert summary["iqr_pct"] == pytest.approx(100.0)   # range / median with fewer than 4 rounds
    assert summary["times_ms"] == pytest.approx([1.0, 2.0, 3.0])


def test_op_counter_counts_a_known_function():
    x = torch.randn(4, 4)
    counter = count_ops(Case(run=lambda: (x + 1).mul_(2).t().sum()))
    assert dict(counter.by_op) == {"aten.add": 1, "aten.mul_": 1, "aten.t": 1, "aten.sum": 1}
    assert counter.total == 4 and counter.views == 1


def test_op_counter_sees_the_backward():
    w = torch.randn(3, requires_grad=True)
    with OpCounter() as forward_only:
        (w * 2).sum()
    with OpCounter() as both:
        (w * 2).sum().backward()
    assert forward_only.total == 2
    assert both.by_op["aten.mul"] >= 2   # the forward product and its gradient


def test_saved_bytes_excludes_parameters():
    weight = nn.Parameter(torch.randn(256, 256))   # 256 KiB: a parameter, not counted
    x = torch.randn(1024, 256)                     # 1 MiB: saved by the matmul

    def run():
        (x @ weight).relu().sum().backward()       # relu saves its 1 MiB output

    case = Case(run=run, prepare=lambda: setattr(weight, "grad", None), params=(weight,))
    assert saved_bytes(case) == 2 * 2 ** 20


def test_compiled_kernel_count_counts_and_resets():
    compiled = torch.compile(lambda t: (t * 2).sin() + 1)
    x = torch.randn(8)
    assert compiled_kernel_count(lambda: compiled(x)) >= 1
    from torch._inductor import metrics
    assert metrics.generated_kernel_count == 0
