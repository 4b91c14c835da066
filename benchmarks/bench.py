"""Speed (and memory) of MABN against native BN and the other norms: ``python -m benchmarks.bench``.

Usage::

    python -m benchmarks.bench --quick                  # < 2 min on 2 CPU cores: the smoke-sized run
    python -m benchmarks.bench --json bench.json        # full run (about 10-15 min on a small CPU)
    python -m benchmarks.bench --rounds 20 --threads 4 --device cuda

Flags: ``--quick`` (smaller shapes, 64 px ResNet-50 at batch 2, fewer rounds), ``--json PATH``
(write every number, plus machine info), ``--rounds N`` (timed rounds of every section),
``--threads N`` (``torch.set_num_threads``), ``--device {auto,cpu,cuda}`` (auto: CUDA when
available). Progress goes to stderr, the markdown tables and target lines to stdout.

Method. Every section runs *interleaved rounds*: a round runs each variant once, in an order
rotated by one position per round, so slow drifts of a shared machine hit all variants alike.
After untimed warm-up rounds, each variant's time is the median over rounds, and ratios are
medians divided by the native-BN median measured in the same rounds. On CUDA each timed call is
bracketed by ``torch.cuda.synchronize``. The Python garbage collector runs between calls, never
inside one. Anything not part of the measured work (zeroing gradients) runs untimed.

Sections:

1. Layers: forward + backward of one norm layer with a fixed upstream gradient, input shapes
   (2,256,56,56), (32,64,56,56), (2,64,200,200). ``MABN`` is ``MABN2d(C, B=2, real_B=32,
   warmup_iters=0, r_warmup_iters=0)`` so the moving averages and ``r`` are live; at shapes whose
   batch holds several groups of B=2 an extra ``MABN split_batch`` row uses ``split_batch=True``.
   ``MABN naive`` is :class:`mabn.naive_mabn.NaiveMABN2d`, written the way the published
   reference layer was; BRN is :class:`mabn.BatchRenorm2d`; GN has 32 groups; LN is
   ``GroupNorm(1, C)``; IN is affine ``InstanceNorm2d``.
2. ResNet-50 (torchvision, ``weights=None``) training step: forward, cross-entropy, backward
   and ``SGD(momentum=0.9).step()``, at batch 2 and 8, 224 px. The SGD learning rate is 0: the
   step still performs all of its arithmetic, but weights stay at their initialization, so the
   un-normalized network (which diverges to inf/NaN within a step or two at any useful learning
   rate) keeps finite activations; inf/NaN/denormal arithmetic would distort its timings.
   ``MABN+CenConv`` is ``convert_norm(model, "MABN", B=batch, real_B=32, warmup_iters=0)`` then
   ``convert_conv(model, "CenConv")``; ``no norm`` is ``convert_norm(model, "")``, the limit.
3. ResNet-50 inference (eval, ``torch.no_grad``) at batch 4, 224 px, for the same variants
   plus ``MABN folded`` and ``BN folded`` (``mabn.fold.fold_norms``: each conv+norm pair
   becomes one plain conv).

Memory, measured on one extra, untimed step per variant after the timed rounds:

* ``peak MiB``: bytes allocated during the step above what was allocated at its start, at their
  peak. On CUDA that is ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` at
  the start. On CPU (no allocator statistics) it is the peak total size of tensor storages
  created by the step's operators and alive at the same time, tracked with a
  ``TorchDispatchMode`` (outputs that alias an operator input, i.e. views and in-place results,
  are not new memory). Weights, optimizer state and the input batch exist before the step and
  are not counted; the gradients are (they are set to None before the step). Allocator caching
  and fragmentation are not counted on CPU.
* ``saved MiB`` (training only): activation memory saved for backward - the total size of the
  distinct storages packed by autograd's saved-tensor hooks during the forward, parameters and
  buffers excluded (the input batch is included). Same method on every device.

Targets (printed as PASS/MISS with the measured ratio; never weakened): MABN layer forward +
backward <= 1.3x native BN at each layer shape; ResNet-50 training step with MABN+CenConv <=
1.10x BN at each batch; folded MABN inference at >= 0.97x the speed of the no-norm network
(time ratio folded / no-norm <= 1 / 0.97). With ``--quick`` the target lines are computed on
the quick sizes and are labelled so.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "BenchConfig", "FULL", "QUICK", "LAYER_VARIANTS", "TRAIN_VARIANTS", "INFER_VARIANTS",
    "Case", "interleaved_times", "bench_layers", "bench_resnet_train", "bench_resnet_infer",
    "measure_memory", "evaluate_targets", "machine_info", "run_benchmark", "format_markdown", "main",
]

LAYER_VARIANTS = ("BN", "MABN", "MABN naive", "BRN", "GN", "IN", "LN")
SPLIT_VARIANT = "MABN split_batch"
TRAIN_VARIANTS = ("BN", "MABN+CenConv", "GN", "IN", "LN", "no norm")
INFER_VARIANTS = TRAIN_VARIANTS + ("MABN folded", "BN folded")
MABN_B, MABN_REAL_B = 2, 32

LAYER_TARGET = 1.3
TRAIN_TARGET = 1.10
FOLDED_SPEED_TARGET = 0.97

MIB = 2.0 ** 20


@dataclass
class BenchConfig:
    """Sizes and repetitions of one benchmark run (``FULL``, ``QUICK`` or a custom one)."""

    layer_shapes: Sequence[Tuple[int, int, int, int]] = ((2, 256, 56, 56), (32, 64, 56, 56), (2, 64, 200, 200))
    layer_rounds: int = 30
    layer_warmup: int = 3
    resolution: int = 224
    train_batches: Sequence[int] = (2, 8)
    infer_batch: int = 4
    train_rounds: int = 10
    infer_rounds: int = 15
    resnet_warmup: int = 2
    arch: str = "resnet50"
    quick: bool = False

    def with_rounds(self, rounds: int) -> "BenchConfig":
        return dataclasses.replace(self, layer_rounds=rounds, train_rounds=rounds, infer_rounds=rounds)


FULL = BenchConfig()
QUICK = BenchConfig(layer_shapes=((2, 64, 28, 28), (8, 32, 28, 28), (2, 32, 64, 64)), layer_rounds=12,
                    layer_warmup=2, resolution=64, train_batches=(2,), infer_batch=4, train_rounds=6,
                    infer_rounds=8, resnet_warmup=1, quick=True)


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing core


@dataclass
class Case:
    """One variant: ``run`` is timed, ``prepare`` (untimed) runs right before each ``run``."""

    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None
    params: Tuple[Tensor, ...] = ()
    state: dict = field(default_factory=dict)


def _rotated(names: Sequence[str], shift: int) -> List[str]:
    shift %= max(len(names), 1)
    return list(names[shift:]) + list(names[:shift])


def interleaved_times(cases: Dict[str, Case], rounds: int, warmup: int, device: torch.device,
                      label: str = "") -> Dict[str, List[float]]:
    """Seconds per call of every case: ``warmup`` untimed rounds, then ``rounds`` timed rounds.

    Each round runs every case once, the order rotated by one position per round.
    """
    names = list(cases)
    times: Dict[str, List[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for index in range(warmup + rounds):
            timed = index >= warmup
            if label:
                what = f"round {index - warmup + 1}/{rounds}" if timed else f"warm-up {index + 1}/{warmup}"
                _log(f"{label}: {what}")
            for name in _rotated(names, index):
                case = cases[name]
                gc.collect()
                gc.disable()
                if case.prepare is not None:
                    case.prepare()
                _sync(device)
                start = time.perf_counter()
                case.run()
                _sync(device)
                elapsed = time.perf_counter() - start
                gc.enable()
                if timed:
                    times[name].append(elapsed)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _summary(seconds: List[float]) -> Dict[str, object]:
    ms = [s * 1e3 for s in seconds]
    median = statistics.median(ms)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        iqr_pct = 100.0 * (q[2] - q[0]) / median
    else:
        iqr_pct = 100.0 * (max(ms) - min(ms)) / median
    return {"median_ms": median, "iqr_pct": iqr_pct, "times_ms": ms}


# ----------------------------------------------------------------------------- memory


class _LiveStorageBytes(TorchDispatchMode):
    """Peak total size of tensor storages created by operators while active and alive at once.

    A storage counts from the operator that returns it until it is freed. Outputs sharing a
    storage with one of the operator's inputs (views, in-place and ``out=`` results) are not
    new allocations.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: Dict[int, Tuple[int, object]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, token: object) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is token:
            del self._live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            try:
                storage = tensor.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            token = object()
            self._live[key] = (nbytes, token)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, token)
        return out


def _storage_key(tensor: Tensor) -> Optional[int]:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class _SavedForBackwardBytes:
    """Total size of the distinct storages autograd saves for backward, ``exclude`` left out."""

    def __init__(self, exclude: Sequence[Tensor]) -> None:
        self.exclude = {_storage_key(t) for t in exclude}
        self.seen: set = set()
        self.total = 0

    def pack(self, tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return tensor
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: Tensor) -> Tensor:
        return tensor


def measure_memory(case: Case, device: torch.device, saved: bool) -> Dict[str, Optional[float]]:
    """Run ``case`` once (untimed) and return ``peak_mib`` and, if ``saved``, ``saved_mib``."""
    if case.prepare is not None:
        case.prepare()
    gc.collect()
    saved_counter = _SavedForBackwardBytes(case.params) if saved else None
    hooks = (torch.autograd.graph.saved_tensors_hooks(saved_counter.pack, saved_counter.unpack)
             if saved_counter is not None else contextlib.nullcontext())
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with hooks:
            case.run()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = _LiveStorageBytes()
        with hooks, tracker:
            case.run()
        peak = tracker.peak
    return {"peak_mib": peak / MIB, "saved_mib": (saved_counter.total / MIB) if saved_counter else None}


# ----------------------------------------------------------------------------- layers


def build_layer(variant: str, channels: int) -> nn.Module:
    """The norm layer benchmarked as ``variant`` (one of LAYER_VARIANTS or SPLIT_VARIANT)."""
    from mabn import BatchRenorm2d, MABN2d, get_norm
    from benchmarks.naive_mabn import NaiveMABN2d

    mabn_kw = dict(B=MABN_B, real_B=MABN_REAL_B, warmup_iters=0, r_warmup_iters=0)
    if variant == "BN":
        return nn.BatchNorm2d(channels)
    if variant == "MABN":
        return MABN2d(channels, **mabn_kw)
    if variant == SPLIT_VARIANT:
        return MABN2d(channels, split_batch=True, **mabn_kw)
    if variant == "MABN naive":
        return NaiveMABN2d(channels, **mabn_kw)
    if variant == "BRN":
        return BatchRenorm2d(channels)
    if variant in ("GN", "IN", "LN"):
        return get_norm(variant, channels)
    raise ValueError(f"unknown layer variant {variant!r}")


def _layer_case(layer: nn.Module, x: Tensor, grad: Tensor) -> Case:
    params = tuple(layer.parameters())

    def prepare() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def run() -> None:
        layer(x).backward(grad)

    return Case(run=run, prepare=prepare, params=params)


def _ratios(rows: List[dict], key: str = "ratio_to_bn", reference: str = "BN") -> None:
    base = next((r["median_ms"] for r in rows if r["variant"] == reference), None)
    for row in rows:
        row[key] = row["median_ms"] / base if base else None


def bench_layers(shapes: Sequence[Tuple[int, int, int, int]], rounds: int, warmup: int,
                 device: torch.device, variants: Sequence[str] = LAYER_VARIANTS) -> List[dict]:
    """Forward + backward of each layer variant at each shape; one row per (shape, variant)."""
    rows: List[dict] = []
    for shape in shapes:
        torch.manual_seed(0)
        names = list(variants)
        if shape[0] % MABN_B == 0 and shape[0] > MABN_B and "MABN" in names:
            names.insert(names.index("MABN") + 1, SPLIT_VARIANT)
        x = torch.randn(shape, device=device).requires_grad_()
        grad = torch.randn(shape, device=device)
        cases = {name: _layer_case(build_layer(name, shape[1]).to(device).train(), x, grad) for name in names}
        label = "layers " + "x".join(map(str, shape))
        times = interleaved_times(cases, rounds, warmup, device, label=label)
        shape_rows = [dict(section="layer", shape=list(shape), variant=name, **_summary(times[name])) for name in names]
        _ratios(shape_rows)
        rows.extend(shape_rows)
        del cases, x, grad
    return rows


# ----------------------------------------------------------------------------- ResNet-50


def mabn_real_B(batch: int, real_B: int = MABN_REAL_B) -> int:
    """``real_B`` (32) when the batch divides it, else the smallest multiple of the batch above it."""
    return real_B if real_B % batch == 0 else batch * math.ceil(real_B / batch)


def base_resnet(arch: str = "resnet50", seed: int = 0) -> nn.Module:
    """torchvision ``arch(weights=None)`` initialized from ``seed``."""
    import torchvision

    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None)


def build_resnet(variant: str, batch: int, arch: str = "resnet50", base: Optional[nn.Module] = None) -> nn.Module:
    """A torchvision ``arch`` (random init, or a deep copy of ``base``) with the norms of ``variant``."""
    from mabn import convert_conv, convert_norm

    model = base_resnet(arch) if base is None else copy.deepcopy(base)
    if variant == "BN":
        return model
    if variant == "MABN+CenConv":
        model = convert_norm(model, "MABN", B=batch, real_B=mabn_real_B(batch), warmup_iters=0)
        return convert_conv(model, "CenConv")
    if variant in ("GN", "IN", "LN"):
        return convert_norm(model, variant)
    if variant == "no norm":
        return convert_norm(model, "")
    raise ValueError(f"unknown ResNet variant {variant!r}")


def _train_case(model: nn.Module, images: Tensor, labels: Tensor) -> Case:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    case = Case(run=lambda: None, prepare=None, params=tuple(model.parameters()) + tuple(model.buffers()))

    def prepare() -> None:
        optimizer.zero_grad(set_to_none=True)

    def run() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        case.state["loss"] = loss.detach()

    case.run, case.prepare = run, prepare
    return case


def _infer_case(model: nn.Module, images: Tensor) -> Case:
    case = Case(run=lambda: None, params=tuple(model.parameters()) + tuple(model.buffers()))

    def run() -> None:
        with torch.no_grad():
            case.state["out"] = model(images)

    case.run = run
    return case


def bench_resnet_train(batch: int, resolution: int, rounds: int, warmup: int, device: torch.device,
                       variants: Sequence[str] = TRAIN_VARIANTS, arch: str = "resnet50") -> List[dict]:
    """Training step (forward, cross-entropy, backward, SGD step) per variant; one row each."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    cases: Dict[str, Case] = {}
    base = base_resnet(arch)
    for name in variants:
        _log(f"{arch} train b{batch} {resolution}px: building {name}")
        model = build_resnet(name, batch, arch, base).to(device).train()
        cases[name] = _train_case(model, images, labels)
    del base
    times = interleaved_times(cases, rounds, warmup, device, label=f"{arch} train b{batch} {resolution}px")
    rows = []
    for name in variants:
        memory = measure_memory(cases[name], device, saved=True)
        loss = cases[name].state["loss"]
        rows.append(dict(section="train", arch=arch, batch=batch, resolution=resolution, variant=name,
                         **_summary(times[name]), **memory, finite=bool(torch.isfinite(loss).item())))
    _ratios(rows)
    return rows


def bench_resnet_infer(batch: int, resolution: int, rounds: int, warmup: int, device: torch.device,
                       variants: Sequence[str] = INFER_VARIANTS, arch: str = "resnet50") -> Tuple[List[dict], List[str]]:
    """Eval-mode ``no_grad`` forward per variant; returns the rows and notes (skipped variants)."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, device=device)
    notes: List[str] = []
    models: Dict[str, nn.Module] = {}
    sources = {"MABN folded": "MABN+CenConv", "BN folded": "BN"}
    base = base_resnet(arch)
    for name in variants:
        if name in sources:
            continue
        _log(f"{arch} infer b{batch} {resolution}px: building {name}")
        models[name] = build_resnet(name, batch, arch, base).to(device).eval()
    folded = [name for name in variants if name in sources]
    if folded:
        try:
            from mabn.fold import fold_norms
        except ImportError as error:
            notes.append(f"{', '.join(folded)} skipped: mabn.fold is not importable ({error})")
            folded = []
        for name in folded:
            source = models.get(sources[name])
            if source is None:
                source = build_resnet(sources[name], batch, arch, base).to(device).eval()
            _log(f"{arch} infer b{batch} {resolution}px: folding {sources[name]}")
            models[name] = fold_norms(source).to(device).eval()
    del base
    names = [name for name in variants if name in models]
    cases = {name: _infer_case(models[name], images) for name in names}
    times = interleaved_times(cases, rounds, warmup, device, label=f"{arch} infer b{batch} {resolution}px")
    rows = []
    for name in names:
        memory = measure_memory(cases[name], device, saved=False)
        out = cases[name].state["out"]
        row = dict(section="infer", arch=arch, batch=batch, resolution=resolution, variant=name,
                   **_summary(times[name]), peak_mib=memory["peak_mib"], finite=bool(torch.isfinite(out).all().item()))
        if name in sources and sources[name] in cases:
            reference = cases[sources[name]].state["out"]
            row["max_rel_diff_to_unfolded"] = ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
        rows.append(row)
    _ratios(rows)
    _ratios(rows, key="ratio_to_no_norm", reference="no norm")
    return rows, notes


# ----------------------------------------------------------------------------- targets, report


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def evaluate_targets(results: dict) -> List[dict]:
    """PASS/MISS records of the targets for whatever sections ``results`` holds."""
    targets = []
    for row in results.get("layers", []):
        if row["variant"] == "MABN":
            ratio = row["ratio_to_bn"]
            targets.append(dict(name=f"MABN layer fwd+bwd {_shape_str(row['shape'])} vs BN", measured=ratio,
                                limit=LAYER_TARGET, rule="time ratio <=", passed=ratio <= LAYER_TARGET))
    for row in results.get("resnet_train", []):
        if row["variant"] == "MABN+CenConv":
            ratio = row["ratio_to_bn"]
            targets.append(dict(name=f"{row['arch']} train step b{row['batch']} {row['resolution']}px MABN+CenConv vs BN",
                                measured=ratio, limit=TRAIN_TARGET, rule="time ratio <=", passed=ratio <= TRAIN_TARGET))
    for row in results.get("resnet_infer", []):
        if row["variant"] == "MABN folded" and row.get("ratio_to_no_norm"):
            speed = 1.0 / row["ratio_to_no_norm"]
            targets.append(dict(name=f"{row['arch']} inference b{row['batch']} {row['resolution']}px MABN folded vs no norm",
                                measured=speed, limit=FOLDED_SPEED_TARGET, rule="speed ratio >=",
                                passed=speed >= FOLDED_SPEED_TARGET))
    return targets


def machine_info(device: torch.device) -> dict:
    """Versions, threads, device and CPU model (from /proc/cpuinfo where present)."""
    import torchvision

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "threads": torch.get_num_threads(),
        "cpu_model": cpu_model or platform.processor() or None, "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def memory_description(device: torch.device) -> dict:
    if device.type == "cuda":
        peak = ("peak_mib: torch.cuda.max_memory_allocated() during one untimed step minus "
                "memory_allocated() at its start (weights, optimizer state, inputs excluded)")
    else:
        peak = ("peak_mib: peak total size of tensor storages created by the step's operators and alive at "
                "once (TorchDispatchMode; views/in-place results are not new memory; weights, optimizer state "
                "and inputs exist before the step and are excluded; gradients are included; allocator caching "
                "is not counted)")
    return {"peak_mib": peak,
            "saved_mib": ("saved_mib (training only): activation memory saved for backward - distinct storages "
                          "packed by autograd saved-tensor hooks during the forward, parameters and buffers "
                          "excluded, input batch included")}


def run_benchmark(config: BenchConfig, device: torch.device) -> dict:
    """Run every section of ``config``; returns the JSON-ready results (targets included)."""
    started = time.perf_counter()
    results: dict = {"machine": machine_info(device), "config": dataclasses.asdict(config),
                     "memory": memory_description(device), "notes": []}
    results["config"]["train_sgd_lr"] = 0.0
    load = results["machine"].get("load_average")
    cpus = results["machine"].get("cpu_count") or 1
    if load and device.type == "cpu" and load[0] > 0.5 * cpus:
        results["notes"].append(
            f"the machine was busy when the run started (1-min load average {load[0]:.1f} on {cpus} CPUs): "
            f"timings are noisy, and with {torch.get_num_threads()} threads multi-threaded kernels can stall "
            f"waiting for descheduled threads; rerun on a quiet machine (or compare with --threads 1)")
        _log("warning: " + results["notes"][-1])
    results["layers"] = bench_layers(config.layer_shapes, config.layer_rounds, config.layer_warmup, device)
    results["resnet_train"] = []
    for batch in config.train_batches:
        results["resnet_train"] += bench_resnet_train(batch, config.resolution, config.train_rounds,
                                                      config.resnet_warmup, device, arch=config.arch)
        gc.collect()
    infer_rows, notes = bench_resnet_infer(config.infer_batch, config.resolution, config.infer_rounds,
                                           config.resnet_warmup, device, arch=config.arch)
    results["resnet_infer"] = infer_rows
    results["notes"] += notes
    results["targets"] = evaluate_targets(results)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _fmt_mib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.1f}"


def format_markdown(results: dict) -> str:
    """The results as markdown tables plus the PASS/MISS target lines."""
    lines: List[str] = []
    machine = results["machine"]
    lines.append(f"# MABN benchmark{' (--quick)' if results['config'].get('quick') else ''}")
    lines.append("")
    lines.append(f"torch {machine['torch']}, device {machine['device']}"
                 f"{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}, {machine['threads']} threads, "
                 f"CPU {machine.get('cpu_model')}; medians over interleaved rounds; ratios are to native BN "
                 f"timed in the same rounds; IQR = interquartile range / median.")
    layers = results.get("layers", [])
    if layers:
        shapes = []
        for row in layers:
            if row["shape"] not in shapes:
                shapes.append(row["shape"])
        canonical = list(LAYER_VARIANTS)
        canonical.insert(canonical.index("MABN") + 1, SPLIT_VARIANT)
        present = {row["variant"] for row in layers}
        variants = [v for v in canonical if v in present] + sorted(present - set(canonical))
        cell = {(tuple(r["shape"]), r["variant"]): r for r in layers}
        lines += ["", f"## Layer forward + backward ({results['config']['layer_rounds']} rounds)", "",
                  "| variant | " + " | ".join(_shape_str(s) for s in shapes) + " |",
                  "|---|" + "---:|" * len(shapes)]
        for variant in variants:
            cells = []
            for shape in shapes:
                row = cell.get((tuple(shape), variant))
                cells.append("—" if row is None else
                             f"{row['median_ms']:.2f} ms ({_fmt_ratio(row['ratio_to_bn'])}, IQR {row['iqr_pct']:.0f}%)")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    train = results.get("resnet_train", [])
    if train:
        lines += ["", f"## {train[0]['arch']} training step, {train[0]['resolution']} px "
                      f"({results['config']['train_rounds']} rounds)", "",
                  "| batch | variant | median ms | vs BN | IQR | peak MiB | saved MiB |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for row in train:
            flag = "" if row.get("finite", True) else " (non-finite loss!)"
            lines.append(f"| {row['batch']} | {row['variant']}{flag} | {row['median_ms']:.1f} | "
                         f"{_fmt_ratio(row['ratio_to_bn'])} | {row['iqr_pct']:.0f}% | {_fmt_mib(row['peak_mib'])} | "
                         f"{_fmt_mib(row['saved_mib'])} |")
    infer = results.get("resnet_infer", [])
    if infer:
        lines += ["", f"## {infer[0]['arch']} inference (eval, no_grad), batch {infer[0]['batch']}, "
                      f"{infer[0]['resolution']} px ({results['config']['infer_rounds']} rounds)", "",
                  "| variant | median ms | vs BN | vs no norm | IQR | peak MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in infer:
            extra = ""
            if "max_rel_diff_to_unfolded" in row:
                extra = f" (max rel diff to unfolded {row['max_rel_diff_to_unfolded']:.1e})"
            lines.append(f"| {row['variant']}{extra} | {row['median_ms']:.1f} | {_fmt_ratio(row['ratio_to_bn'])} | "
                         f"{_fmt_ratio(row.get('ratio_to_no_norm'))} | {row['iqr_pct']:.0f}% | {_fmt_mib(row['peak_mib'])} |")
    memory = results.get("memory", {})
    if memory:
        lines += ["", "Memory columns:"] + [f"- {text}" for text in memory.values()]
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    targets = results.get("targets", [])
    if targets:
        quick = " [quick sizes; the targets are defined at the full sizes]" if results["config"].get("quick") else ""
        lines += ["", f"## Targets{quick}", ""]
        for t in targets:
            lines.append(f"{'PASS' if t['passed'] else 'MISS'}  {t['name']}: {t['measured']:.3f} "
                         f"(target {t['rule']} {t['limit']:.2f})")
    if "elapsed_s" in results:
        lines += ["", f"Total time {results['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes, ResNet-50 at 64 px and batch 2, fewer rounds (< 2 min on 2 cores)")
    parser.add_argument("--json", metavar="PATH", help="write all results and machine info to PATH")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds for every section")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default auto: cuda when available")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    config = QUICK if args.quick else FULL
    if args.rounds is not None:
        config = config.with_rounds(args.rounds)
    _log(f"device {device}, {torch.get_num_threads()} threads, {'quick' if config.quick else 'full'} run")
    results = run_benchmark(config, device)
    print(format_markdown(results), flush=True)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        _log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
