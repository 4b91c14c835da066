"""The measuring tools count and time what they claim to."""
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.autograd import DeviceType

from benchmarks.harness import (BACK_TO_BACK, CPU_SAMPLE_S, CUDA_EVENT, MAX_REPEATS, PERF_COUNTER, Case, OpCounter,
                                Timer, call_schedule, calibrate_repeats, compiled_kernels, count_kernel_launches,
                                count_ops, cuda_event_calls, cuda_event_seconds, interleaved_times, kernel_launches,
                                paired_ratio, perf_counter_calls, perf_counter_seconds, relocate, repeats_for,
                                saved_bytes, select_timer, summarize)


def test_interleaved_rounds_rotate_and_skip_warmup():
    calls = []
    cases = {name: Case(run=lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times(cases, rounds=3, warmup=1, device=torch.device("cpu"), repeats=1)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_prepare_runs_before_every_call():
    order = []
    case = Case(run=lambda: order.append("run"), prepare=lambda: order.append("prepare"))
    interleaved_times({"only": case}, rounds=2, warmup=1, device=torch.device("cpu"))
    assert len(order) > 6 and order == ["prepare", "run"] * (len(order) // 2)


def test_cpu_samples_last_at_least_the_cpu_sample_time():
    cases = {"short": Case(run=lambda: time.sleep(CPU_SAMPLE_S / 4)), "long": Case(run=lambda: time.sleep(CPU_SAMPLE_S))}
    times = interleaved_times(cases, rounds=2, warmup=0, device=torch.device("cpu"))
    assert times.timer == PERF_COUNTER and times.repeats["long"] == 1 and 2 <= times.repeats["short"] <= 4
    assert {name: len(seconds) for name, seconds in times.items()} == {"short": 2, "long": 2}


def test_explicit_repeats_run_back_to_back_with_prepare_before_each_call():
    calls = []
    cases = {name: Case(run=lambda name=name: calls.append(name), prepare=lambda name=name: calls.append(name.upper()))
             for name in "ab"}
    times = interleaved_times(cases, rounds=1, warmup=1, device=torch.device("cpu"), repeats=3, calls=BACK_TO_BACK)
    # warm-up: one call each; the timed round (rotated by one) runs each case 3 times back to back
    assert "".join(calls) == "AaBb" + "BbBbBb" + "AaAaAa"
    assert times.repeats == {"a": 3, "b": 3}
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 1, "b": 1}


def test_interleaved_rounds_mix_the_calls_of_the_variants():
    calls = []
    cases = {name: Case(run=lambda name=name: calls.append(name), prepare=lambda name=name: calls.append(name.upper()))
             for name in "ab"}
    interleaved_times(cases, rounds=1, warmup=1, device=torch.device("cpu"), repeats=3)
    # the timed round starts with b (rotated by one) and alternates, prepare before every call
    assert "".join(calls) == "AaBb" + "BbAaBbAaBbAa"


def test_call_schedule_spreads_each_variants_calls_over_the_round():
    schedule = call_schedule(["a", "b", "c"], {"a": 4, "b": 2, "c": 1})
    assert sorted(schedule) == ["a"] * 4 + ["b"] * 2 + ["c"]
    assert schedule == ["a", "b", "a", "c", "a", "b", "a"]
    assert call_schedule(["b", "a"], {"a": 1, "b": 1}) == ["b", "a"]


def test_interleaved_samples_time_each_call_without_its_prepare(monkeypatch):
    from benchmarks import harness

    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def advance(seconds):
        clock[0] += seconds

    cases = {"slow": Case(run=lambda: advance(0.003), prepare=lambda: advance(1.0)),
             "fast": Case(run=lambda: advance(0.001), prepare=lambda: advance(1.0))}
    times = interleaved_times(cases, rounds=2, warmup=0, device=torch.device("cpu"), repeats=4)
    assert times["slow"] == pytest.approx([0.003, 0.003]) and times["fast"] == pytest.approx([0.001, 0.001])
    assert perf_counter_calls([cases["fast"], cases["slow"]], torch.device("cpu")) == pytest.approx([0.001, 0.003])


def test_refresh_runs_before_every_round_then_one_untimed_call_per_case():
    events = []
    cases = {name: Case(run=lambda name=name: events.append(name)) for name in "ab"}
    times = interleaved_times(cases, rounds=2, warmup=1, device=torch.device("cpu"), repeats=2,
                              refresh=lambda: events.append("R"))
    assert "".join(events) == "R" "ab" "ab" + "R" "ba" "baba" + "R" "ab" "abab"
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 2, "b": 2}


def test_relocate_moves_data_to_new_memory_and_keeps_values_and_objects():
    x = torch.randn(3, 4, requires_grad=True)
    values, pointer, tensor = x.detach().clone(), x.data_ptr(), x
    relocate(x)
    assert tensor is x and x.requires_grad and x.data_ptr() != pointer
    assert torch.equal(x.detach(), values)


def test_an_unknown_call_order_is_refused():
    with pytest.raises(ValueError, match="calls must be"):
        interleaved_times({"a": Case(run=lambda: None)}, rounds=1, warmup=0, device=torch.device("cpu"), calls="random")


def test_select_timer_by_device_type():
    assert select_timer(torch.device("cpu")) == Timer(PERF_COUNTER, perf_counter_seconds, perf_counter_calls)
    assert select_timer(torch.device("cuda")) == Timer(CUDA_EVENT, cuda_event_seconds, cuda_event_calls)
    assert select_timer(torch.device("cuda", 1)).name == CUDA_EVENT


def test_perf_counter_divides_a_sample_by_its_calls(monkeypatch):
    from benchmarks import harness

    ticks = iter([10.0, 10.8])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    calls = []
    assert perf_counter_seconds(Case(run=lambda: calls.append(1)), 4, torch.device("cpu")) == pytest.approx(0.2)
    assert len(calls) == 4


@pytest.mark.parametrize("seconds_per_call, target_s, max_repeats, expected", [
    (1e-5, 1e-3, 256, 100),     # exactly 1 ms: no extra call from rounding
    (3e-4, 1e-3, 256, 4),       # 3 calls are 0.9 ms: one more
    (2e-3, 1e-3, 256, 1),       # one call already lasts 1 ms
    (1e-7, 1e-3, 256, 256),     # capped
    (0.0, 1e-3, 64, 64),        # below the clock's resolution: the cap
])
def test_repeats_for_reaches_the_target_sample_length(seconds_per_call, target_s, max_repeats, expected):
    assert repeats_for(seconds_per_call, target_s, max_repeats) == expected


def test_calibrate_repeats_sizes_each_case_from_its_fastest_probe_then_back_to_back():
    seen = []
    # seconds per call: three single-call probes, then (k > 1 only) one sample of k calls
    per_call = {"fast": [3e-5, 2e-5, 2.5e-5, 1e-5], "slow": [6e-4, 4e-4, 5e-4, 4.5e-4], "long": [3e-3] * 3}

    def fake(case, repeats, device):
        seen.append((case.state["name"], repeats))
        return per_call[case.state["name"]].pop(0)

    cases = {name: Case(run=lambda: None, state={"name": name}) for name in per_call}
    repeats = calibrate_repeats(cases, torch.device("cpu"), Timer("fake", fake, None), probes=3, target_s=1e-3)
    # fast: 50 calls from its 20 us probe, then 100 from 10 us back to back; slow keeps 3 (never lowered)
    assert repeats == {"fast": 100, "slow": 3, "long": 1}
    assert seen == [(name, 1) for name in per_call] * 3 + [("fast", 50), ("slow", 3)]
    assert repeats_for(1e-9) == MAX_REPEATS


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


def test_kernel_launches_of_a_profile_without_cuda_events_is_zero():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(8, 8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x * 2).sum().backward()
    assert len(prof.events()) > 0
    launches = kernel_launches(prof.events())
    assert launches.kernels == 0 and launches.transfers == 0 and not launches.by_kernel


def test_kernel_launches_counts_cuda_kernels_and_transfers_only():
    def event(device_type, activity, name):
        return SimpleNamespace(device_type=device_type, activity_type=activity, name=name)

    events = [event(DeviceType.CUDA, "kernel", "k1"), event(DeviceType.CUDA, "kernel", "k1"),
              event(DeviceType.CUDA, "kernel", "k2"), event(DeviceType.CUDA, "gpu_memcpy", "Memcpy DtoH"),
              event(DeviceType.CUDA, "gpu_memset", "Memset (Device)"),
              event(DeviceType.CUDA, "gpu_user_annotation", "region"),
              event(DeviceType.CPU, "cuda_runtime", "cudaLaunchKernel"), event(DeviceType.CPU, "cpu_op", "aten::mul")]
    launches = kernel_launches(events)
    assert launches.kernels == 3 and launches.transfers == 2 and dict(launches.by_kernel) == {"k1": 2, "k2": 1}


def test_count_kernel_launches_is_none_off_cuda():
    calls = []
    assert count_kernel_launches(Case(run=lambda: calls.append(1)), torch.device("cpu")) is None
    assert calls == []   # nothing runs: kernel launches exist only on CUDA


def test_saved_bytes_excludes_parameters():
    weight = nn.Parameter(torch.randn(256, 256))   # 256 KiB: a parameter, not counted
    x = torch.randn(1024, 256)                     # 1 MiB: saved by the matmul

    def run():
        (x @ weight).relu().sum().backward()       # relu saves its 1 MiB output

    case = Case(run=run, prepare=lambda: setattr(weight, "grad", None), params=(weight,))
    assert saved_bytes(case) == 2 * 2 ** 20


def test_compiled_kernels_counts_fused_kernels_and_resets():
    compiled = torch.compile(lambda t: (t * 2).sin().sum() + t.cos().amax())
    x = torch.randn(64)
    kernels = compiled_kernels(lambda: compiled(x))
    assert 1 <= kernels.fused <= kernels.codegen
    from torch._inductor import metrics
    assert metrics.generated_kernel_count == 0


def test_paired_ratio_is_the_median_of_same_round_ratios():
    # round 2 ran under load: a ratio of medians (2.0 / 1.0) would mix rounds, the paired one does not
    variant, reference = [1.5, 6.0, 2.0, 1.6], [1.0, 4.0, 1.0, 1.0]
    assert paired_ratio(variant, reference) == pytest.approx(1.55)
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio([1.0, 2.0], [1.0])
