"""MABN's fused statistics kernels (``fused_statistics=True``): the same numbers as the eager path
(under Triton's interpreter on the CPU, and on CUDA), where they run, and what a step dispatches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mabn
import mabn.moving_average_bn as moving_average_bn
from mabn import MABN2d
from benchmarks.harness import OpCounter

pytest.importorskip("triton", reason="the fused statistics kernels are Triton kernels")

from fused_statistics_check import CASES, STEPS, compare_fused_with_eager  # noqa: E402 (needs Triton)

CHECK_SCRIPT = Path(__file__).with_name("fused_statistics_check.py")
# largest relative difference from the eager path per layer dtype: a few roundings of that dtype
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3}


def _assert_matches_eager(report: dict, layer_dtype: torch.dtype) -> None:
    assert report["outputs"] <= TOLERANCE[layer_dtype], report
    assert report["buffers"] <= TOLERANCE[layer_dtype], report
    assert report["counters_equal"], report
    assert report["calls"] == {"forward": STEPS, "backward": STEPS}, report
    assert report["skipped_updates"] == 1, report  # the NaN input pixel's channel, once


def _triton_version() -> tuple:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


@pytest.mark.skipif(_triton_version() < (3, 8), reason="Triton 3.6's interpreter cannot run a loop to a runtime bound "
                                                     "(the kernels' channel loop); checked with Triton 3.8")
def test_kernels_match_the_eager_path_under_the_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(CHECK_SCRIPT)], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [report["case"] for report in reports] == [case[0] for case in CASES]
    for report, case in zip(reports, CASES):
        _assert_matches_eager(report, case[4])


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_kernels_match_the_eager_path_on_cuda(case, real_cuda_device):
    _, kwargs, shape, dtype, layer_dtype, loss_scale = case
    _assert_matches_eager(compare_fused_with_eager(kwargs, shape, dtype, layer_dtype, loss_scale, real_cuda_device),
                          layer_dtype)


def _step(layer: MABN2d, x: torch.Tensor):
    inputs = x.clone().requires_grad_()
    y = layer(inputs)
    y.backward(torch.ones_like(y))
    return y.detach(), inputs.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


def test_cpu_without_the_interpreter_runs_the_eager_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def unexpected():
        raise AssertionError("the fused kernels ran on the CPU without Triton's interpreter")

    monkeypatch.setattr(moving_average_bn, "_fused_kernels", unexpected)
    eager = MABN2d(8, B=2, real_B=8, warmup_iters=1, r_warmup_iters=2)
    fused = MABN2d(8, B=2, real_B=8, warmup_iters=1, r_warmup_iters=2, fused_statistics=True)
    torch.manual_seed(0)
    for _ in range(6):
        x = torch.randn(2, 8, 3, 3)
        for expected, actual in zip(_step(eager, x), _step(fused, x)):
            assert torch.equal(expected, actual)
        eager.weight.grad = eager.bias.grad = fused.weight.grad = fused.bias.grad = None
    for key, value in eager.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key


@pytest.mark.parametrize("kwargs, groups, compiling, expected", [
    (dict(fused_statistics=True), 1, False, True),
    (dict(fused_statistics=False), 1, False, False),
    (dict(fused_statistics=True, split_batch=True), 1, False, False),
    (dict(fused_statistics=True, split_batch=True), 4, False, True),
    (dict(fused_statistics=True), 1, True, False),
    (dict(fused_statistics=True, split_batch=True), 4, True, False),
])
def test_where_the_fused_kernels_run(monkeypatch, kwargs, groups, compiling, expected):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    layer = MABN2d(8, **kwargs)
    assert moving_average_bn._uses_fused_statistics(layer, groups, torch.device("cuda")) is expected
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert moving_average_bn._uses_fused_statistics(layer, groups, torch.device("cpu")) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert moving_average_bn._uses_fused_statistics(layer, groups, torch.device("cpu")) is expected


def test_the_option_is_shown_and_not_saved():
    layer = MABN2d(8, fused_statistics=True)
    assert "fused_statistics=True" in repr(layer)
    assert "fused_statistics" not in repr(MABN2d(8))
    assert set(layer.state_dict()) == set(MABN2d(8).state_dict())


def test_without_triton_the_first_forward_says_what_to_install(monkeypatch):
    monkeypatch.setattr(moving_average_bn, "_fused_kernels_run_on", lambda device: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "mabn.fused_statistics", raising=False)
    monkeypatch.delattr(mabn, "fused_statistics", raising=False)
    layer = MABN2d(8, fused_statistics=True)
    with pytest.raises(RuntimeError, match="needs Triton .*install the triton package.*fused_statistics=False"):
        layer(torch.randn(2, 8, 3, 3))


class _CapturedLaunch:
    """Stands in for a Triton kernel: keeps the arguments of its last launch."""

    def __init__(self) -> None:
        self.args, self.kwargs = (), {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return launch


_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64"}


def _signature(kernel, launch: _CapturedLaunch):
    """Triton's signature and constexprs for ``kernel`` called with the captured arguments."""
    values = dict(zip(kernel.arg_names, launch.args), **launch.kwargs)
    signature = {name: ("constexpr" if name in launch.kwargs else
                        "*" + _TRITON_TYPES[values[name].dtype] if isinstance(values[name], torch.Tensor) else "i32")
                 for name in kernel.arg_names}
    return signature, dict(launch.kwargs)


@pytest.mark.parametrize("split", [False, True], ids=["ring", "split"])
@pytest.mark.parametrize("layer_dtype, input_dtype, loss_scale, settled, capability", [
    (torch.float32, torch.float32, False, True, 90),
    (torch.float32, torch.float32, True, False, 90),
    (torch.float32, torch.float32, False, True, 80),
    (torch.float64, torch.float64, True, True, 90),
    (torch.float32, torch.bfloat16, False, True, 90),
    (torch.float16, torch.float16, True, True, 90),
    (torch.bfloat16, torch.bfloat16, False, True, 80),
])
def test_kernels_compile_for_cuda_with_the_arguments_the_layer_passes(monkeypatch, layer_dtype, input_dtype,
                                                                    loss_scale, settled, capability, split):
    """Triton compiles the kernels to PTX and a cubin for an A100 (sm_80) or an H100/H200 (sm_90)
    without a GPU: the compiler's type checks and lowering, which the interpreter does not run,
    applied to the argument types a layer of each dtype passes."""
    import mabn.fused_statistics as fused_statistics
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = (("_mabn_grouped_forward_kernel", "_mabn_grouped_backward_kernel") if split else
             ("_mabn_forward_statistics_kernel", "_mabn_backward_coefficient_kernel"))
    kernels = {name: getattr(fused_statistics, name) for name in names}
    launches = {name: _CapturedLaunch() for name in kernels}
    for name, launch in launches.items():
        monkeypatch.setattr(fused_statistics, name, launch)
    monkeypatch.setattr(moving_average_bn, "_fused_kernels_run_on", lambda device: True)
    warmup = dict(warmup_iters=0, r_warmup_iters=0) if settled else dict(warmup_iters=5, r_warmup_iters=5)
    layer = MABN2d(8, fused_statistics=True, split_batch=split, **warmup).to(layer_dtype)
    layer.grad_scale = torch.tensor(256.0) if loss_scale else None
    layer(torch.randn(6 if split else 2, 8, 3, 3, dtype=input_dtype, requires_grad=True)).sum().backward()
    for name, kernel in kernels.items():
        signature, constexprs = _signature(kernel, launches[name])
        compiled = compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", capability, 32))
        assert ".entry " + name in compiled.asm["ptx"] and compiled.asm["cubin"]


class _CountedLaunch:
    """Stands in for a Triton kernel: counts launches and computes nothing."""

    def __init__(self, launches: list, name: str) -> None:
        self.launches, self.name = launches, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(self.name)


@pytest.mark.parametrize("split", [False, True], ids=["ring", "split"])
def test_kernel_writes_bump_the_version_counters_the_host_counters_trust(monkeypatch, split):
    """The kernels write buffers through pointers; the wrappers bump their versions as an in-place
    op would, and the layer records the counters after that, so the host copy stays trusted."""
    import mabn.fused_statistics as fused_statistics

    launches: list = []
    monkeypatch.setattr(moving_average_bn, "_fused_kernels_run_on", lambda device: True)
    for name in ("_mabn_forward_statistics_kernel", "_mabn_grouped_forward_kernel",
                 "_mabn_backward_coefficient_kernel", "_mabn_grouped_backward_kernel"):
        monkeypatch.setattr(fused_statistics, name, _CountedLaunch(launches, name))
    layer = MABN2d(8, fused_statistics=True, split_batch=split)
    forward_written = ("buffer_x2", "running_var", "num_batches_tracked", "groups_seen", "skipped_updates")
    before = {name: buffer._version for name, buffer in layer.named_buffers()}
    y = layer(torch.randn(4 if split else 2, 8, 3, 3, requires_grad=True))
    after_forward = {name: buffer._version for name, buffer in layer.named_buffers()}
    assert all(after_forward[name] > before[name] for name in forward_written)
    assert after_forward["buffer_gz"] == before["buffer_gz"]
    y.sum().backward()
    assert layer.buffer_gz._version > after_forward["buffer_gz"]
    assert layer.host_counters.known((layer.num_batches_tracked, layer.groups_seen)) == (1, 2 if split else 1)
    assert len(launches) == 2


def test_a_strided_buffer_is_refused_before_a_kernel_reads_it():
    import mabn.fused_statistics as fused_statistics

    window = torch.zeros(8, 4).t()
    with pytest.raises(ValueError, match="index window as a contiguous tensor.*fused_statistics=False"):
        fused_statistics.backward_coefficient(torch.zeros(4), torch.ones(4), None, torch.ones(4), window, 9, 0, True)


@pytest.mark.cuda
def test_a_layer_on_another_gpu_than_the_current_one(real_cuda_device):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.manual_seed(0)
    eager = MABN2d(8, B=2, real_B=8, warmup_iters=1, r_warmup_iters=2).to("cuda:1")
    fused = MABN2d(8, B=2, real_B=8, warmup_iters=1, r_warmup_iters=2, fused_statistics=True).to("cuda:1")
    with torch.cuda.device(0):
        for _ in range(4):
            x = torch.randn(2, 8, 3, 3, device="cuda:1")
            for expected, actual in zip(_step(eager, x), _step(fused, x)):
                torch.testing.assert_close(actual, expected)
            eager.weight.grad = eager.bias.grad = fused.weight.grad = fused.bias.grad = None
    torch.testing.assert_close(fused.running_var, eager.running_var)


@pytest.mark.parametrize("split, batch, eager_ops, fused_ops", [(False, 2, 27, 11), (True, 4, 50, 27)],
                         ids=["ring", "split into two groups"])
def test_a_settled_fused_step_dispatches_fewer_aten_ops_and_two_kernels(monkeypatch, split, batch, eager_ops,
                                                                        fused_ops):
    """What a GPU runs for one settled training forward + backward of a fused layer, counted on the
    CPU with the kernels stubbed: one Triton kernel per pass in place of the bookkeeping ops. A
    ring layer keeps BN's two reductions and its forward, three result allocations, the
    input-gradient update and its coefficient's view, and the engine's three gradient
    accumulations (11 ops); a split layer of two groups 27 ops, 11 of them views."""
    import mabn.fused_statistics as fused_statistics

    launches: list = []
    monkeypatch.setattr(moving_average_bn, "_fused_kernels_run_on", lambda device: True)
    for name in ("_mabn_forward_statistics_kernel", "_mabn_grouped_forward_kernel"):
        monkeypatch.setattr(fused_statistics, name, _CountedLaunch(launches, "forward"))
    for name in ("_mabn_backward_coefficient_kernel", "_mabn_grouped_backward_kernel"):
        monkeypatch.setattr(fused_statistics, name, _CountedLaunch(launches, "backward"))
    counts = {}
    for fused in (False, True):
        layer = MABN2d(64, warmup_iters=0, r_warmup_iters=0, split_batch=split, fused_statistics=fused)
        x = torch.randn(batch, 64, 7, 7, requires_grad=True)
        grad = torch.ones_like(x)
        for _ in range(20):
            layer(x).backward(grad)
        launches.clear()
        with OpCounter() as counter:
            layer(x).backward(grad)
        counts[fused] = counter.total
        assert launches == (["forward", "backward"] if fused else []), fused
    assert counts == {False: eager_ops, True: fused_ops}
