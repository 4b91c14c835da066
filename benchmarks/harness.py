"""Measuring tools shared by every benchmark section: interleaved timing, op counting, saved bytes.

Timing method. A *round* runs every variant once, in an order rotated by one position per
round, so slow drifts of a shared machine hit all variants alike. After untimed warm-up rounds,
a variant's time is the median over the timed rounds, and ratios divide medians measured in the
same rounds. On CUDA each timed call is bracketed by ``torch.cuda.synchronize``. The garbage
collector runs between rounds and is off during them (memory is freed by reference counting),
so no collection lands inside a timed call; ``Case.prepare`` (zeroing gradients) is untimed.
"""
from __future__ import annotations

import collections
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Counter, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Case", "interleaved_times", "summarize", "OpCounter", "count_ops", "SavedTensorBytes",
           "saved_bytes", "compiled_kernel_count", "log"]


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One variant: ``run`` is what gets timed; ``prepare`` runs untimed right before each ``run``.

    ``params`` are the tensors that exist before a step and are not activations (parameters and
    buffers); ``state`` keeps whatever ``run`` wants to expose (the last loss, output).
    """

    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None
    params: Sequence[Tensor] = ()
    state: dict = field(default_factory=dict)


def interleaved_times(cases: Mapping[str, Case], rounds: int, warmup: int, device: torch.device,
                      label: str = "") -> Dict[str, List[float]]:
    """Seconds per call of every case: ``warmup`` untimed rounds, then ``rounds`` timed rounds."""
    names = list(cases)
    times: Dict[str, List[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for index in range(warmup + rounds):
            timed = index >= warmup
            if label:
                log(f"{label}: " + (f"round {index - warmup + 1}/{rounds}" if timed else f"warm-up {index + 1}/{warmup}"))
            shift = index % len(names) if names else 0
            gc.collect()
            gc.disable()
            for name in names[shift:] + names[:shift]:
                case = cases[name]
                if case.prepare is not None:
                    case.prepare()
                _sync(device)
                start = time.perf_counter()
                case.run()
                _sync(device)
                elapsed = time.perf_counter() - start
                if timed:
                    times[name].append(elapsed)
            gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:
            gc.disable()
    return times


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


def compiled_kernel_count(fn: Callable[[], object]) -> int:
    """Kernels inductor generates to compile ``fn`` (which calls a ``torch.compile``-d module).

    Reads ``torch._inductor.metrics.generated_kernel_count`` around one call and resets dynamo's
    caches afterwards, so nothing compiled here leaks into later measurements.
    """
    from torch._inductor import metrics

    metrics.reset()
    try:
        fn()
        return metrics.generated_kernel_count
    finally:
        metrics.reset()
        torch._dynamo.reset()
