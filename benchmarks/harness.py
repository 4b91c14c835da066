"""Measuring tools shared by every benchmark section: interleaved timing, op and kernel counting, saved bytes.

Timing method. A *round* runs every variant, in an order rotated by one position per round, so
slow drifts of a shared machine hit all variants alike. After untimed warm-up rounds, a
variant's time is the median over the timed rounds. A ratio of two variants is the median over
rounds of the ratio of their times in the same round (:func:`paired_ratio`): a load change that
lasts a round slows both samples of that round alike and leaves their ratio, where a ratio of
medians would take the two medians from different rounds. The garbage collector runs between
rounds and is off during them (memory is freed by reference counting), so no collection lands
inside a timed sample; ``Case.prepare`` (zeroing gradients) runs untimed before each call.

A variant's sample in a round is ``k`` calls, and its time is their total divided by ``k``.
``k`` is calibrated per case once per :func:`interleaved_times` call, after the warm-up, so that
a sample lasts at least ``CPU_SAMPLE_S`` (5 ms: a sub-millisecond call alone is at the mercy of
a timer interrupt or a cache miss) or ``CUDA_SAMPLE_S`` (1 ms, far above the CUDA events'
resolution of about a microsecond); a per-case ``k`` keeps a slow variant from running hundreds
of times per sample just because a fast one needs that. How the calls of a round are ordered
(``calls``):

* ``INTERLEAVED`` (the default): the calls of all variants are mixed, each variant's ``k`` calls
  spread evenly over the round (:func:`call_schedule`), and every call is timed on its own. A
  disturbance of a few milliseconds then hits the variants in proportion instead of landing in
  one variant's sample, and no layer runs back to back with itself, which no network does either
  (back-to-back calls keep one layer's code and data hot).
* ``BACK_TO_BACK``: each variant's ``k`` calls in a row, timed together (``prepare`` then runs
  inside the window between them; it is host-only work here, gradients set to ``None``).

``refresh`` (optional) runs untimed at the start of every round and may move the inputs to new
memory (:func:`relocate`), followed by one untimed call of every case: on a virtual machine a
layer's time depends on where its tensors landed (a ratio at 32x16x32x32 moved by 25% between
two placements, see docs/benchmarks.md), and a fixed placement would bias every round of a pass
alike, where a new one per round averages it out.

The clock depends on the device (:func:`select_timer`): on the CPU ``time.perf_counter``, on
CUDA ``torch.cuda.Event`` records on the current stream around each call (or each back-to-back
sample), read after the round: the events time the GPU timeline, so a call's time covers its
kernels plus any gap in which the GPU waits for the host to launch, what a training loop of
small layers sees, not the host's synchronize latency.
"""
from __future__ import annotations

import collections
import gc
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Counter, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Case", "Timer", "Times", "PERF_COUNTER", "CUDA_EVENT", "CPU_SAMPLE_S", "CUDA_SAMPLE_S", "MAX_REPEATS",
           "INTERLEAVED", "BACK_TO_BACK", "perf_counter_seconds", "cuda_event_seconds", "perf_counter_calls",
           "cuda_event_calls", "select_timer", "repeats_for", "calibrate_repeats", "call_schedule", "relocate",
           "interleaved_times", "paired_ratio", "summarize", "OpCounter", "count_ops", "KernelLaunches", "kernel_launches",
           "count_kernel_launches", "SavedTensorBytes", "saved_bytes", "CompiledKernels", "compiled_kernels", "log"]

PERF_COUNTER, CUDA_EVENT = "perf_counter", "cuda_event"
CUDA_SAMPLE_S = 1e-3     # shortest CUDA-event sample the calibration aims for
CPU_SAMPLE_S = 5e-3      # shortest perf_counter sample the calibration aims for
MAX_REPEATS = 256        # most calls in one sample (a 4 us layer reaches 1 ms)
INTERLEAVED, BACK_TO_BACK = "interleaved", "back-to-back"   # how the calls of a round are ordered


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One variant: ``run`` is what gets timed; ``prepare`` runs right before each ``run``.

    ``prepare`` is untimed, except between the back-to-back calls of a CUDA sample with ``k > 1``
    (see the module docstring).

    ``params`` are the tensors that exist before a step and are not activations (parameters and
    buffers); ``state`` keeps whatever ``run`` wants to expose (the last loss, output).
    """

    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None
    params: Sequence[Tensor] = ()
    state: dict = field(default_factory=dict)


def perf_counter_seconds(case: Case, repeats: int, device: torch.device) -> float:
    """Seconds per call of ``repeats`` back-to-back calls, on the host clock.

    With ``repeats == 1`` this is one ``prepare`` then one timed ``run`` (the CPU sample).
    """
    if case.prepare is not None:
        case.prepare()
    _sync(device)
    start = time.perf_counter()
    case.run()
    for _ in range(repeats - 1):
        if case.prepare is not None:
            case.prepare()
        case.run()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def cuda_event_seconds(case: Case, repeats: int, device: torch.device) -> float:
    """Seconds per call of ``repeats`` back-to-back calls, between two CUDA events.

    The device is synchronized first, so the window opens on an idle GPU when the host starts
    issuing the case; ``elapsed_time`` (ms) is read once the end event has completed.
    """
    if case.prepare is not None:
        case.prepare()
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    case.run()
    for _ in range(repeats - 1):
        if case.prepare is not None:
            case.prepare()
        case.run()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def perf_counter_calls(calls: Sequence[Case], device: torch.device) -> List[float]:
    """Seconds of each of ``calls`` (cases, in order), each timed on its own on the host clock after
    its untimed ``prepare``."""
    seconds = []
    for case in calls:
        if case.prepare is not None:
            case.prepare()
        _sync(device)
        start = time.perf_counter()
        case.run()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def cuda_event_calls(calls: Sequence[Case], device: torch.device) -> List[float]:
    """Seconds of each of ``calls`` (cases, in order) between two CUDA events recorded around it on
    the current stream (``prepare`` runs untimed before each); the events are read once all calls
    are issued, so the host never waits for the GPU between calls."""
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    events = []
    for case in calls:
        if case.prepare is not None:
            case.prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        case.run()
        end.record(stream)
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


class Timer(NamedTuple):
    """A clock: ``name`` as reported, ``seconds_per_call(case, repeats, device)`` for one
    back-to-back sample, and ``each_call(cases, device)`` for calls timed one by one."""

    name: str
    seconds_per_call: Callable[[Case, int, torch.device], float]
    each_call: Callable[[Sequence[Case], torch.device], List[float]]


def select_timer(device: torch.device) -> Timer:
    """CUDA events on a CUDA device, ``time.perf_counter`` on any other.

    CUDA kernels run asynchronously: a host clock around ``synchronize`` adds the host's
    synchronization latency to every call, which swamps a layer of a few microseconds. Events
    on the stream time the GPU timeline itself. On the CPU the host clock is the right one.
    """
    if device.type == "cuda":
        return Timer(CUDA_EVENT, cuda_event_seconds, cuda_event_calls)
    return Timer(PERF_COUNTER, perf_counter_seconds, perf_counter_calls)


def repeats_for(seconds_per_call: float, target_s: float = CUDA_SAMPLE_S, max_repeats: int = MAX_REPEATS) -> int:
    """Fewest calls ``k`` with ``k * seconds_per_call >= target_s``, clamped to ``[1, max_repeats]``.

    A non-positive ``seconds_per_call`` (below the clock's resolution) gives ``max_repeats``.
    """
    if seconds_per_call <= 0:
        return max_repeats
    return max(1, min(max_repeats, math.ceil(target_s / seconds_per_call * (1 - 1e-9))))


def calibrate_repeats(cases: Mapping[str, Case], device: torch.device, timer: Timer, probes: int = 3,
                      target_s: float = CUDA_SAMPLE_S, max_repeats: int = MAX_REPEATS) -> Dict[str, int]:
    """Calls per sample of every case, so that a sample lasts at least ``target_s``.

    First ``k`` = :func:`repeats_for` the case's fastest of ``probes`` single calls (the probes
    run in rounds over the cases, like the timed rounds). A single call also pays the start-up
    before its first kernel, so a case with ``k > 1`` then times one sample of ``k`` calls and
    raises ``k`` to :func:`repeats_for` that back-to-back time per call when it is shorter.
    """
    fastest = {name: math.inf for name in cases}
    for _ in range(probes):
        for name, case in cases.items():
            fastest[name] = min(fastest[name], timer.seconds_per_call(case, 1, device))
    repeats = {name: repeats_for(seconds, target_s, max_repeats) for name, seconds in fastest.items()}
    for name, k in repeats.items():
        if k > 1:
            back_to_back = timer.seconds_per_call(cases[name], k, device)
            repeats[name] = max(k, repeats_for(back_to_back, target_s, max_repeats))
    return repeats


class Times(Dict[str, List[float]]):
    """Seconds per call of every case, one entry per timed round, with how they were measured.

    ``timer`` is the clock's name (``perf_counter`` or ``cuda_event``); ``repeats[name]`` the
    calls per timed sample of that case.
    """

    def __init__(self, names: Iterable[str], timer: str) -> None:
        super().__init__((name, []) for name in names)
        self.timer = timer
        self.repeats: Dict[str, int] = {name: 1 for name in self}


def call_schedule(names: Sequence[str], repeats: Mapping[str, int]) -> List[str]:
    """The calls of one interleaved round: each of ``names`` ``repeats[name]`` times, call ``j`` of
    a name with ``k`` calls at position ``(j + 0.5) / k`` of the round (ties in ``names`` order),
    so every variant's calls are spread evenly over the round."""
    slots = [((j + 0.5) / repeats[name], index, name) for index, name in enumerate(names)
             for j in range(repeats[name])]
    return [name for _, _, name in sorted(slots)]


def relocate(*tensors: Tensor) -> None:
    """Move each tensor's data to new memory with the same values (the tensor objects stay, so
    cases that hold them see the move): a ``refresh`` for :func:`interleaved_times`."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.data = tensor.data.clone()


def interleaved_times(cases: Mapping[str, Case], rounds: int, warmup: int, device: torch.device,
                      label: str = "", repeats: Optional[int] = None, calls: str = INTERLEAVED,
                      refresh: Optional[Callable[[], None]] = None) -> Times:
    """Seconds per call of every case: ``warmup`` untimed rounds, then ``rounds`` timed rounds.

    ``repeats`` is the calls per timed sample of every case; ``None`` means
    :func:`calibrate_repeats` (after the warm-up) to samples of ``CPU_SAMPLE_S`` or
    ``CUDA_SAMPLE_S``. Warm-up samples are single calls. ``calls`` orders a round's calls
    (``INTERLEAVED`` or ``BACK_TO_BACK``) and ``refresh`` runs before every round, followed by
    one untimed call per case (see the module docstring).
    """
    if calls not in (INTERLEAVED, BACK_TO_BACK):
        raise ValueError(f"calls must be {INTERLEAVED!r} or {BACK_TO_BACK!r}, got {calls!r}")
    names = list(cases)
    timer = select_timer(device)
    times = Times(names, timer.name)
    gc_was_enabled = gc.isenabled()
    try:
        for index in range(warmup + rounds):
            timed = index >= warmup
            if label:
                log(f"{label}: " + (f"round {index - warmup + 1}/{rounds}" if timed else f"warm-up {index + 1}/{warmup}"))
            shift = index % len(names) if names else 0
            order = names[shift:] + names[:shift]
            gc.collect()
            gc.disable()
            if refresh is not None:
                refresh()
                timer.each_call([cases[name] for name in order], device)
            if index == warmup and names:
                if repeats is not None:
                    times.repeats = {name: repeats for name in names}
                else:
                    target = CUDA_SAMPLE_S if timer.name == CUDA_EVENT else CPU_SAMPLE_S
                    times.repeats = calibrate_repeats(cases, device, timer, target_s=target)
                if label and max(times.repeats.values()) > 1:
                    log(f"{label}: calls per {timer.name} sample " + ", ".join(
                        f"{name} {k}" for name, k in times.repeats.items()))
            counts = times.repeats if timed else {name: 1 for name in names}
            if calls == BACK_TO_BACK:
                sample = {name: timer.seconds_per_call(cases[name], counts[name], device) for name in order}
            else:
                schedule = call_schedule(order, counts)
                totals = dict.fromkeys(order, 0.0)
                for name, seconds in zip(schedule, timer.each_call([cases[name] for name in schedule], device)):
                    totals[name] += seconds
                sample = {name: totals[name] / counts[name] for name in order}
            if timed:
                for name in names:
                    times[name].append(sample[name])
            gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()
    return times


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``seconds[i] / reference[i]``: two variants' times from the same
    interleaved rounds (see the module docstring)."""
    if len(seconds) != len(reference) or not seconds:
        raise ValueError(f"paired ratios need times from the same rounds, got {len(seconds)} and {len(reference)}")
    return statistics.median(a / b for a, b in zip(seconds, reference))


def summarize(seconds: Sequence[float]) -> Dict[str, object]:
    """Median in ms, spread (interquartile range / median, %; range with < 4 rounds), all times."""
    ms = [s * 1e3 for s in seconds]
    median = statistics.median(ms)
    if len(ms) >= 4:
        q1, _, q3 = statistics.quantiles(ms, n=4)
        spread = q3 - q1
    else:
        spread = max(ms) - min(ms)
    return {"median_ms": median, "iqr_pct": 100.0 * spread / median, "times_ms": ms}


class OpCounter(TorchDispatchMode):
    """Counts every operator call that reaches the dispatcher while active (forward and backward).

    ``total`` counts all of them; ``views`` those that only make a view (no kernel reads data);
    ``by_op`` is keyed by overload packet, e.g. ``aten.mul``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = collections.Counter()
        self.total = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[str(func.overloadpacket)] += 1
        self.total += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))


def count_ops(case: Case) -> OpCounter:
    """Operator calls of one (untimed) ``case.run()``, after ``case.prepare()``."""
    if case.prepare is not None:
        case.prepare()
    with OpCounter() as counter:
        case.run()
    return counter


KERNEL_ACTIVITY = "kernel"
TRANSFER_ACTIVITIES = ("gpu_memcpy", "gpu_memset")


@dataclass
class KernelLaunches:
    """Device work of one profiled call: kernel launches (also by kernel name) and memcpy/memset operations."""

    kernels: int = 0
    transfers: int = 0
    by_kernel: Counter[str] = field(default_factory=collections.Counter)


def kernel_launches(events: Iterable[object]) -> KernelLaunches:
    """Counts the CUDA kernels among torch profiler events (``prof.events()``).

    An event counts when its ``device_type`` is ``DeviceType.CUDA`` and its kineto
    ``activity_type`` is ``"kernel"``; ``"gpu_memcpy"``/``"gpu_memset"`` count as transfers;
    anything else (CPU ops, CUDA runtime calls, annotations, syncs) is ignored. A profile
    without CUDA events gives zero kernels and zero transfers.
    """
    from torch.autograd import DeviceType

    result = KernelLaunches()
    for event in events:
        if getattr(event, "device_type", None) != DeviceType.CUDA:
            continue
        activity = getattr(event, "activity_type", None)
        if activity == KERNEL_ACTIVITY:
            result.kernels += 1
            result.by_kernel[event.name] += 1
        elif activity in TRANSFER_ACTIVITIES:
            result.transfers += 1
    return result


def count_kernel_launches(case: Case, device: torch.device) -> Optional[KernelLaunches]:
    """Kernels one (untimed) ``case.run()`` launches on the GPU, after ``case.prepare()``.

    Runs under ``torch.profiler.profile`` with CPU and CUDA activities and counts with
    :func:`kernel_launches`. Returns ``None`` off CUDA, where kernel launches do not exist
    (:func:`count_ops` gives the dispatched operators), and when this build's profiler cannot
    trace CUDA (no CUPTI), so a missing measurement never reads as zero kernels.
    """
    from torch.profiler import ProfilerActivity, profile, supported_activities

    if device.type != "cuda" or ProfilerActivity.CUDA not in supported_activities():
        return None
    if case.prepare is not None:
        case.prepare()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        case.run()
        torch.cuda.synchronize(device)
    return kernel_launches(prof.events())


def _storage_key(tensor: Tensor) -> Optional[int]:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """While active, adds up the bytes of the distinct storages autograd saves for backward.

    Storages of ``exclude`` (parameters and buffers) are not counted: what remains is the
    activation memory a training step holds until its backward.
    """

    def __init__(self, exclude: Sequence[Tensor] = ()) -> None:
        self.exclude = {_storage_key(t) for t in exclude}
        self.seen: set = set()
        self.total = 0
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor


def saved_bytes(case: Case) -> int:
    """Activation bytes saved for backward by one (untimed) ``case.run()``."""
    if case.prepare is not None:
        case.prepare()
    counter = SavedTensorBytes(case.params)
    with counter:
        case.run()
    return counter.total


class CompiledKernels(NamedTuple):
    """Kernels of a compiled call: ``fused`` is how many the compiled graphs define and run (one
    launch each on a GPU; one C++ function call each on the CPU); ``codegen`` is inductor's
    ``generated_kernel_count``, which on the CPU also counts the vectorized and scalar loop
    variants it writes inside one function."""

    fused: int
    codegen: int


_KERNEL_DEFINITION = re.compile(r"^\w+ = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.MULTILINE)


def compiled_kernels(fn: Callable[[], object]) -> CompiledKernels:
    """Kernels inductor generates to compile ``fn`` (which calls a ``torch.compile``-d module).

    Reads the generated code and ``torch._inductor.metrics.generated_kernel_count`` around one
    call and resets dynamo's caches afterwards, so nothing compiled here leaks into later
    measurements.
    """
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    metrics.reset()
    try:
        _, sources = run_and_get_code(fn)
        fused = sum(len(_KERNEL_DEFINITION.findall(source)) for source in sources)
        return CompiledKernels(fused, metrics.generated_kernel_count)
    finally:
        metrics.reset()
        torch._dynamo.reset()
