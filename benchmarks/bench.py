"""Speed, op count and memory of MABN against native BN and the other norms.

Usage (from the repository root)::

    python -m benchmarks.bench --quick                # ResNet-50 at 112 px, fewer rounds
    python -m benchmarks.bench --json bench.json      # full run (ResNet-50 at 224 px)
    python -m benchmarks.bench --quick --device cuda  # GPU: CUDA-event timing, kernel launches
    python -m benchmarks.bench --rounds 20 --threads 4 --device cuda

Every timing is a median over interleaved rounds (:mod:`benchmarks.harness`) and every ratio is
the median over rounds of the two variants' times in the same round. Sections, in order:

1. ``ops``: operator calls dispatched by one training forward + backward of a single layer on a
   (2, 64, 7, 7) input (the split/grouped variants get a batch of 4, i.e. two groups of B=2),
   counted with a ``TorchDispatchMode``; on CUDA also the GPU kernels that forward + backward
   launches, counted from the torch profiler (:func:`benchmarks.harness.count_kernel_launches`),
   with ratios to BN and GN; and the kernels inductor generates for one compiled MABN forward +
   backward. On CUDA ``MABN fused`` and ``MABN split B=2 fused`` (``fused_statistics=True``:
   :mod:`mabn.fused_statistics`) are counted too, their Triton kernel launches (from the
   profiler: no aten op dispatches them) added to their ops, and held to MABN's and split
   MABN's op budgets.
2. ``layers``: forward + backward of one layer with a fixed upstream gradient, as a ratio to
   BN, to GroupNorm (32 groups) and in *copies*: units of ``x.clone()`` timed in the same rounds.
   ``MABN`` is ``MABN2d(C, B=2, real_B=32, warmup_iters=0, r_warmup_iters=0)``, so the moving
   averages and ``r`` are live; ``MABN naive`` is :class:`benchmarks.naive_mabn.NaiveMABN2d`;
   on CUDA the fused variants are timed too, ``MABN fused`` held to MABN's small-map limits and
   ``MABN split B=2 fused`` to the baselines' limit.
   The baseline shapes add ghost BN, Batch Renorm (``warmup_steps=0``) and split MABN at B=2.
3. ``train``: torchvision ResNet training step (forward, cross-entropy, backward,
   ``SGD(lr=0, momentum=0.9).step()``: every operation runs, weights stay finite), at batches 2
   and 8, as a ratio to BN and to GN. ``MABN+CenConv`` is ``convert_norm(model, "MABN",
   B=batch, real_B=32, warmup_iters=0)`` then ``convert_conv(model, "CenConv")``. After the
   timed rounds one untimed step per variant measures the activation bytes saved for backward
   (parameters and buffers excluded). On CUDA ``MABN+CenConv fused`` (the same with
   ``fused_statistics=True``) is timed beside them and held to the same limit.
4. ``infer``: eval-mode ``no_grad`` forward of ``fold_norms(MABN+CenConv model)`` against the
   same network with no norm at all.

``--quick`` runs the same sections and reports the same targets: the layer shapes are the real
ones with fewer rounds; ResNet-50 runs at 112 px with fewer rounds, which the report says.

A sample is ``k`` calls divided by ``k``, with ``k`` calibrated per variant and section
(:func:`benchmarks.harness.interleaved_times`; ``k`` is in the layer table, the section headings
and the JSON as ``repeats``) so that a sample lasts at least 5 ms on the CPU
(``time.perf_counter``) or 1 ms on CUDA (``--device cuda``, or ``auto`` on a GPU machine: CUDA
events on the current stream, :func:`benchmarks.harness.select_timer`). By default the calls of
all variants in a round are mixed and each is timed on its own (``--calls back-to-back``: each
variant's ``k`` calls in a row), and the layer section moves its input and upstream gradient to
new memory before every round (:func:`benchmarks.harness.relocate`); the harness's docstring says
why. CUDA runs the same rounds as the CPU; the header names the GPU. On the CPU the ``ops`` section reports dispatched
operators only: kernel launches exist only on CUDA. ``--repeat`` passes (default 2) check that
the ratios hold on a second pass.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.harness import (BACK_TO_BACK, CUDA_EVENT, INTERLEAVED, Case, Times, compiled_kernels,
                                count_kernel_launches, count_ops, interleaved_times, log, paired_ratio, relocate,
                                saved_bytes, select_timer, summarize)
from benchmarks.targets import Target, check, format_target

__all__ = ["BenchConfig", "FULL", "QUICK", "TINY", "build_layer", "layer_case", "build_resnet", "train_case", "bench_ops",
           "bench_layers", "bench_train", "bench_infer", "evaluate_targets", "run_benchmark",
           "format_markdown", "main"]

Shape = Tuple[int, int, int, int]
MIB = 2.0 ** 20
B = 2              # MABN's normalization batch, and the group size of the grouped baselines
REAL_B = 32        # MABN's real_B (the statistics window covers real_B // B iterations)

BN, GN, MABN, SPLIT, NAIVE = "BN", "GN", "MABN", "MABN split B=2", "MABN naive"
BRN, BRN_GROUPED, GHOST, COPY = "BRN", "BRN B=2", "ghost BN B=2", "copy"
MABN_CENCONV, NO_NORM, MABN_FOLDED = "MABN+CenConv", "no norm", "MABN folded"
MABN_CENCONV_FUSED = "MABN+CenConv fused"   # on CUDA only, like the fused layer variants
MABN_FUSED = "MABN fused"   # MABN with fused_statistics=True: on CUDA only (Triton kernels)
SPLIT_FUSED = "MABN split B=2 fused"
FUSED_KERNEL_PREFIX = "_mabn_"   # the names of mabn.fused_statistics's Triton kernels

OP_COUNT_VARIANTS = (MABN, SPLIT, BRN, BRN_GROUPED, GHOST, BN, GN)
GROUPED_VARIANTS = (SPLIT, SPLIT_FUSED, BRN_GROUPED, GHOST)   # these get a batch holding several groups of B
LAYER_VARIANTS = (BN, MABN, SPLIT, NAIVE, GN, COPY)
BASELINE_VARIANTS = (GHOST, BRN_GROUPED)           # added at the baseline shapes
TRAIN_VARIANTS = (BN, MABN_CENCONV, GN)
INFER_VARIANTS = (NO_NORM, MABN_FOLDED)

OPS_LIMITS = {MABN: 20, SPLIT: 30, GHOST: 30, BRN: 40, BRN_GROUPED: 40}
FUSED_OF = {MABN_FUSED: MABN, SPLIT_FUSED: SPLIT}   # fused variant -> the eager one whose budgets it meets
OPS_MOONSHOT = 10                  # BN's 7 plus 3
SMALL_LIMITS = {(2, 64, 7, 7): 1.6}   # other small shapes: SMALL_LIMIT
SMALL_LIMIT, FULL_LIMIT, FULL_GN_LIMIT = 1.2, 1.0, 1.2
COPIES_GOAL = 6.0
BASELINE_LIMIT = 1.5
TRAIN_LIMITS = {2: 1.05}           # batch -> limit of MABN+CenConv vs BN; other batches are reported only
SAVED_LIMIT = 1.10
FOLDED_SPEED_LIMIT = 0.97
COMPILED_KERNELS_LIMIT = 10
REPEAT_AGREEMENT = 0.05            # every ratio of a repeat within 5% of the first pass
RATIO_KEYS = ("ratio_to_bn", "ratio_to_gn", "ratio_to_no_norm")
CONTEXT_VARIANTS = (NAIVE, COPY)   # reported beside the targets, not judged


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetitions of one run (``FULL``, ``QUICK`` or ``TINY``)."""

    name: str = "full"
    op_shape: Shape = (2, 64, 7, 7)
    op_grouped_batch: int = 4
    small_shapes: Tuple[Shape, ...] = ((2, 64, 7, 7), (2, 256, 14, 14), (8, 32, 28, 28))
    full_shapes: Tuple[Shape, ...] = ((2, 256, 56, 56), (32, 64, 56, 56), (2, 64, 200, 200))
    baseline_shapes: Tuple[Shape, ...] = ((32, 16, 32, 32), (32, 64, 56, 56))
    layer_rounds: int = 30
    layer_warmup: int = 3
    arch: str = "resnet50"
    resolution: int = 224
    train_batches: Tuple[int, ...] = (2, 8)
    train_rounds: int = 10
    infer_batch: int = 4
    infer_rounds: int = 15
    resnet_warmup: int = 2
    compile_kernels: bool = True
    repeat: int = 2                # passes over the timed sections; the first is reported, the rest check it
    calls: str = INTERLEAVED       # how a round orders its calls (benchmarks.harness)

    def with_rounds(self, rounds: int) -> "BenchConfig":
        return dataclasses.replace(self, layer_rounds=rounds, train_rounds=rounds, infer_rounds=rounds)


FULL = BenchConfig()
QUICK = dataclasses.replace(FULL, name="quick", layer_rounds=15, layer_warmup=3, resolution=112, train_rounds=6,
                            infer_rounds=8, resnet_warmup=2)
# Seconds-long smoke run for the tests (hidden ``--tiny`` flag): numbers are meaningless.
TINY = dataclasses.replace(FULL, name="tiny", op_shape=(2, 8, 4, 4), small_shapes=((2, 8, 4, 4),),
                           full_shapes=((4, 8, 6, 6),), baseline_shapes=((4, 8, 6, 6),), layer_rounds=2,
                           layer_warmup=1, arch="resnet18", resolution=32, train_batches=(2,), train_rounds=1,
                           infer_batch=2, infer_rounds=1, resnet_warmup=1, compile_kernels=False, repeat=1)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------- layers


def build_layer(variant: str, channels: int) -> nn.Module:
    """The single norm layer benchmarked as ``variant``, in training mode."""
    from mabn import BatchRenorm2d, GhostBatchNorm2d, MABN2d

    from benchmarks.naive_mabn import NaiveMABN2d

    mabn_kwargs = dict(B=B, real_B=REAL_B, warmup_iters=0, r_warmup_iters=0)
    builders = {
        BN: lambda: nn.BatchNorm2d(channels),
        GN: lambda: nn.GroupNorm(32 if channels % 32 == 0 else channels, channels),
        MABN: lambda: MABN2d(channels, **mabn_kwargs),
        MABN_FUSED: lambda: MABN2d(channels, fused_statistics=True, **mabn_kwargs),
        SPLIT_FUSED: lambda: MABN2d(channels, split_batch=True, fused_statistics=True, **mabn_kwargs),
        SPLIT: lambda: MABN2d(channels, split_batch=True, **mabn_kwargs),
        NAIVE: lambda: NaiveMABN2d(channels, **mabn_kwargs),
        BRN: lambda: BatchRenorm2d(channels, warmup_steps=0),
        BRN_GROUPED: lambda: BatchRenorm2d(channels, warmup_steps=0, B=B),
        GHOST: lambda: GhostBatchNorm2d(channels, B),
    }
    if variant not in builders:
        raise ValueError(f"unknown layer variant {variant!r}; choose one of {sorted(builders)}")
    return builders[variant]().train()


def _layer_case(variant: str, x: Tensor, grad: Tensor) -> Case:
    """Forward + backward of ``variant`` on ``x`` (or, for ``copy``, one ``clone`` of its data)."""
    if variant == COPY:
        data = x.detach()
        return Case(run=data.clone)
    return layer_case(build_layer(variant, x.shape[1]).to(x.device), x, grad)


def layer_case(layer: nn.Module, x: Tensor, grad: Tensor) -> Case:
    """Forward + backward of ``layer`` on ``x`` with upstream gradient ``grad``; gradients cleared
    before each call."""
    params = tuple(layer.parameters())

    def prepare() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    return Case(run=lambda: layer(x).backward(grad), prepare=prepare, params=params + tuple(layer.buffers()))


def _inputs(shape: Sequence[int], device: torch.device) -> Tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.randn(*shape, device=device).requires_grad_(), torch.randn(*shape, device=device)


def bench_ops(config: BenchConfig, device: torch.device) -> List[dict]:
    """Operator calls of one training forward + backward per variant (after one warm-up call).

    On CUDA each row also has ``kernels`` (GPU kernel launches), ``transfers`` (memcpy/memset),
    ``by_kernel`` and ``kernels_vs_bn``/``kernels_vs_gn``; elsewhere these are ``None``.
    """
    rows = []
    for variant in OP_COUNT_VARIANTS + fused_variants(device):
        shape = list(config.op_shape)
        if variant in GROUPED_VARIANTS:
            shape[0] = config.op_grouped_batch
        case = _layer_case(variant, *_inputs(shape, device))
        case.prepare()
        case.run()
        counter = count_ops(case)
        launches = count_kernel_launches(case, device)
        # a Triton kernel is launched without an aten op: the profiler sees it (CUDA only)
        triton_launches = None if launches is None else sum(
            count for name, count in launches.by_kernel.items() if name.startswith(FUSED_KERNEL_PREFIX))
        rows.append(dict(variant=variant, shape=shape, ops=counter.total + (triton_launches or 0),
                         triton_launches=triton_launches, views=counter.views,
                         by_op=dict(counter.by_op.most_common()),
                         kernels=None if launches is None else launches.kernels,
                         transfers=None if launches is None else launches.transfers,
                         by_kernel=None if launches is None else dict(launches.by_kernel.most_common())))
    for key, reference in (("kernels_vs_bn", BN), ("kernels_vs_gn", GN)):
        base = next((row["kernels"] for row in rows if row["variant"] == reference), None)
        for row in rows:
            row[key] = row["kernels"] / base if row["kernels"] is not None and base else None
    return rows


def compiled_mabn_kernels(config: BenchConfig, device: torch.device) -> Dict[str, int]:
    """Kernels inductor generates for one ``torch.compile``-d MABN forward + backward: the fused
    kernels the step runs, and inductor's codegen count (:class:`benchmarks.harness.CompiledKernels`)."""
    x, grad = _inputs(config.op_shape, device)
    layer = torch.compile(build_layer(MABN, x.shape[1]).to(device))
    return compiled_kernels(lambda: layer(x).backward(grad))._asdict()


def fused_variants(device: torch.device) -> Tuple[str, ...]:
    """``MABN fused`` and ``MABN split B=2 fused`` where their Triton kernels run (CUDA, with
    Triton installed), else nothing."""
    from importlib.util import find_spec

    return (MABN_FUSED, SPLIT_FUSED) if device.type == "cuda" and find_spec("triton") is not None else ()


def _layer_shapes(config: BenchConfig, device: torch.device) -> List[Tuple[Shape, List[str]]]:
    """Every distinct shape once, with the union of the variants its targets need."""
    plan: Dict[Shape, List[str]] = {}
    for shape in config.small_shapes + config.full_shapes + config.baseline_shapes:
        variants = plan.setdefault(tuple(shape), [])
        wanted = list(LAYER_VARIANTS) + list(fused_variants(device))
        wanted += list(BASELINE_VARIANTS) if shape in config.baseline_shapes else []
        if not (shape[0] > B and shape[0] % B == 0):
            wanted = [variant for variant in wanted if variant not in (SPLIT, SPLIT_FUSED)]
        variants += [v for v in wanted if v not in variants]
    return list(plan.items())


def _timing(times: Times, variant: str) -> Dict[str, object]:
    """How a variant was timed, stored in its row: the clock and the calls per sample."""
    return {"timer": times.timer, "repeats": times.repeats[variant]}


def _add_ratio(rows: List[dict], key: str, reference: str) -> None:
    """``row[key]``: the row's time over the reference variant's, paired by round (None without one)."""
    base = next((row["times_ms"] for row in rows if row["variant"] == reference), None)
    for row in rows:
        row[key] = paired_ratio(row["times_ms"], base) if base else None


def bench_layers(config: BenchConfig, device: torch.device) -> List[dict]:
    """One row per (shape, variant): median ms, ratio to BN and to GN, and copies of the input."""
    rows: List[dict] = []
    for shape, variants in _layer_shapes(config, device):
        x, grad = _inputs(shape, device)
        cases = {variant: _layer_case(variant, x, grad) for variant in variants}
        times = interleaved_times(cases, config.layer_rounds, config.layer_warmup, device,
                                  label=f"layers {_shape_str(shape)}", calls=config.calls,
                                  refresh=lambda: relocate(x, grad))
        shape_rows = [dict(shape=list(shape), variant=v, **summarize(times[v]), **_timing(times, v))
                      for v in variants]
        _add_ratio(shape_rows, "ratio_to_bn", BN)
        _add_ratio(shape_rows, "ratio_to_gn", GN)
        _add_ratio(shape_rows, "copies", COPY)
        rows += shape_rows
        del cases, x, grad
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- ResNet


def build_resnet(variant: str, batch: int, base: nn.Module) -> nn.Module:
    """A deep copy of the torchvision ``base`` with the norms of ``variant``."""
    from mabn import convert_conv, convert_norm, fold_norms

    model = copy.deepcopy(base)
    if variant == BN:
        return model
    if variant in (MABN_CENCONV, MABN_CENCONV_FUSED, MABN_FOLDED):
        real_b = REAL_B if REAL_B % batch == 0 else batch * math.ceil(REAL_B / batch)
        model = convert_norm(model, "MABN", B=batch, real_B=real_b, warmup_iters=0,
                             fused_statistics=variant == MABN_CENCONV_FUSED)
        model = convert_conv(model, "CenConv")
        return fold_norms(model) if variant == MABN_FOLDED else model
    if variant == GN:
        return convert_norm(model, "GN")
    if variant == NO_NORM:
        return convert_norm(model, "")
    raise ValueError(f"unknown ResNet variant {variant!r}")


def _base_resnet(arch: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None)


def train_case(model: nn.Module, images: Tensor, labels: Tensor) -> Case:
    """A training step of ``model`` (cross-entropy, backward, ``SGD(lr=0, momentum=0.9).step()``); the
    last loss in ``state``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    case = Case(run=lambda: None, prepare=lambda: optimizer.zero_grad(set_to_none=True),
                params=tuple(model.parameters()) + tuple(model.buffers()))

    def run() -> None:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        case.state["loss"] = loss.detach()

    case.run = run
    return case


def bench_train(config: BenchConfig, batch: int, device: torch.device) -> List[dict]:
    """Training step per variant (ratios to BN and to GN), then the activation bytes each saves for backward."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, config.resolution, config.resolution, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    base = _base_resnet(config.arch)
    variants = TRAIN_VARIANTS + ((MABN_CENCONV_FUSED,) if fused_variants(device) else ())
    cases = {v: train_case(build_resnet(v, batch, base).to(device).train(), images, labels) for v in variants}
    label = f"{config.arch} train b{batch} {config.resolution}px"
    times = interleaved_times(cases, config.train_rounds, config.resnet_warmup, device, label=label, calls=config.calls)
    rows = []
    for variant, case in cases.items():
        saved = saved_bytes(case)
        rows.append(dict(arch=config.arch, batch=batch, resolution=config.resolution, variant=variant,
                         **summarize(times[variant]), **_timing(times, variant), saved_mib=saved / MIB,
                         finite=bool(torch.isfinite(case.state["loss"]).item())))
    _add_ratio(rows, "ratio_to_bn", BN)
    _add_ratio(rows, "ratio_to_gn", GN)
    bn_saved = next(row["saved_mib"] for row in rows if row["variant"] == BN)
    for row in rows:
        row["saved_ratio_to_bn"] = row["saved_mib"] / bn_saved
    return rows


def bench_infer(config: BenchConfig, device: torch.device) -> List[dict]:
    """Eval ``no_grad`` forward of the folded MABN+CenConv network against the no-norm one."""
    torch.manual_seed(0)
    images = torch.randn(config.infer_batch, 3, config.resolution, config.resolution, device=device)
    base = _base_resnet(config.arch)
    models = {v: build_resnet(v, config.infer_batch, base).to(device).eval() for v in INFER_VARIANTS}
    unfolded = build_resnet(MABN_CENCONV, config.infer_batch, base).to(device).eval()
    cases = {variant: Case(run=torch.no_grad()(functools.partial(model, images))) for variant, model in models.items()}
    times = interleaved_times(cases, config.infer_rounds, config.resnet_warmup, device,
                              label=f"{config.arch} infer b{config.infer_batch} {config.resolution}px",
                              calls=config.calls)
    rows = [dict(arch=config.arch, batch=config.infer_batch, resolution=config.resolution, variant=v,
                 **summarize(times[v]), **_timing(times, v)) for v in INFER_VARIANTS]
    _add_ratio(rows, "ratio_to_no_norm", NO_NORM)
    with torch.no_grad():
        folded, reference = models[MABN_FOLDED](images), unfolded(images)
    rows[INFER_VARIANTS.index(MABN_FOLDED)]["max_rel_diff_to_unfolded"] = (
        (folded - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
    return rows


# ----------------------------------------------------------------------------- targets, report


def _row(rows: List[dict], variant: str, **where) -> Optional[dict]:
    return next((r for r in rows if r["variant"] == variant and all(r[k] == v for k, v in where.items())), None)


def _value(row: Optional[dict], key: str) -> Optional[float]:
    return None if row is None else row.get(key)


def _ops_targets(ops: List[dict]) -> List[Target]:
    """The op budgets; the fused variants (in a CUDA run) are held to their eager variants', their
    Triton launches counted as ops."""
    targets = []
    limits = list(OPS_LIMITS.items()) + [(fused, OPS_LIMITS[eager]) for fused, eager in FUSED_OF.items()
                                         if _row(ops, fused)]
    for variant, limit in limits:
        row = _row(ops, variant)
        name = f"{variant} ops per fwd+bwd {_shape_str(row['shape']) if row else ''}"
        targets.append(check(name, _value(row, "ops"), "<=", limit, unit="ops"))
        if variant in (MABN, MABN_FUSED):
            targets.append(check(name + " (moonshot)", _value(row, "ops"), "<=", OPS_MOONSHOT, "goal", "ops"))
    return targets


def _layer_targets(layers: List[dict], config: BenchConfig) -> List[Target]:
    """The layer ratios; ``MABN fused`` rows (a CUDA run) are held to MABN's small-map limits."""
    targets = []
    mabn_variants = [MABN] + ([MABN_FUSED] if _row(layers, MABN_FUSED) else [])
    for shape in config.small_shapes:
        for variant in mabn_variants:
            row = _row(layers, variant, shape=list(shape))
            targets.append(check(f"{variant} layer {_shape_str(shape)} vs BN", _value(row, "ratio_to_bn"), "<=",
                                 SMALL_LIMITS.get(tuple(shape), SMALL_LIMIT)))
    for shape in config.full_shapes:
        row = _row(layers, MABN, shape=list(shape))
        targets.append(check(f"MABN layer {_shape_str(shape)} vs BN", _value(row, "ratio_to_bn"), "<=", FULL_LIMIT))
        targets.append(check(f"MABN layer {_shape_str(shape)} vs GN", _value(row, "ratio_to_gn"), "<=", FULL_GN_LIMIT))
        targets.append(check(f"MABN layer {_shape_str(shape)} in input copies", _value(row, "copies"), "<=",
                             COPIES_GOAL, "goal", "copies"))
    for shape in config.baseline_shapes:
        for variant in (GHOST, BRN_GROUPED, SPLIT) + ((SPLIT_FUSED,) if _row(layers, SPLIT_FUSED) else ()):
            row = _row(layers, variant, shape=list(shape))
            targets.append(check(f"{variant} layer {_shape_str(shape)} vs BN", _value(row, "ratio_to_bn"), "<=",
                                 BASELINE_LIMIT))
    return targets


def evaluate_targets(results: dict, config: BenchConfig) -> List[Target]:
    """Every target and goal of the run, in report order."""
    targets = _ops_targets(results.get("ops", [])) + _layer_targets(results.get("layers", []), config)
    if config.compile_kernels:
        kernels = results.get("compiled_mabn_kernels")
        targets.append(check("inductor fused kernels per MABN fwd+bwd", kernels and kernels["fused"], "<=",
                             COMPILED_KERNELS_LIMIT, unit="kernels"))
    train = results.get("train", [])
    where = f"{config.arch} {config.resolution}px"
    for batch in config.train_batches:
        if batch in TRAIN_LIMITS:
            for variant in (MABN_CENCONV,) + ((MABN_CENCONV_FUSED,) if _row(train, MABN_CENCONV_FUSED) else ()):
                row = _row(train, variant, batch=batch)
                targets.append(check(f"{where} train step b{batch} {variant} vs BN", _value(row, "ratio_to_bn"), "<=",
                                     TRAIN_LIMITS[batch]))
    batch = min(config.train_batches)
    row = _row(train, MABN_CENCONV, batch=batch)
    targets.append(check(f"{where} b{batch} activation memory saved for backward MABN+CenConv vs BN",
                         _value(row, "saved_ratio_to_bn"), "<=", SAVED_LIMIT))
    row = _row(results.get("infer", []), MABN_FOLDED)
    ratio = _value(row, "ratio_to_no_norm")
    targets.append(check(f"{where} b{config.infer_batch} inference speed MABN folded vs no norm",
                         None if ratio is None else 1.0 / ratio, ">=", FOLDED_SPEED_LIMIT))
    agreement = results.get("repeat_agreement")
    if agreement is not None:
        targets.append(check(f"largest ratio change between {config.repeat} passes", agreement["max_change"], "<=",
                             REPEAT_AGREEMENT, unit="fraction"))
    return targets


def _ratio_changes(first: List[dict], other: List[dict], section: str) -> List[dict]:
    """Relative change of every ratio of ``other`` against the same row and ratio of ``first``."""
    changes = []
    for row, again in zip(first, other):
        for key in RATIO_KEYS:
            if row.get(key) and again.get(key) and row["variant"] not in (BN, NO_NORM):
                label = " ".join(str(row[k]) for k in ("shape", "batch") if k in row)
                changes.append(dict(section=section, row=f"{row['variant']} {label}".strip(), ratio=key,
                                    first=row[key], repeat=again[key], change=abs(again[key] / row[key] - 1.0),
                                    judged=row["variant"] not in CONTEXT_VARIANTS))
    return changes


def repeat_agreement(passes: List[Dict[str, List[dict]]]) -> Optional[dict]:
    """The largest relative change between the first pass and a later one of a ratio of a variant
    with targets (the context rows, naive MABN and the copy, are listed but not judged), with the
    ratio it belongs to; None with one pass."""
    changes = [change for later in passes[1:] for section in ("layers", "train", "infer")
               for change in _ratio_changes(passes[0][section], later[section], section)]
    judged = [c for c in changes if c["judged"]]
    if not judged:
        return None
    worst = max(judged, key=lambda c: c["change"])
    return {"passes": len(passes), "max_change": worst["change"], "worst": worst, "changes": changes}


def machine_info(device: torch.device) -> dict:
    """Versions, threads, device (GPU name on CUDA), clock, CPU model and load (the context every number needs)."""
    import torchvision

    cpu_model = platform.processor() or None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle
                              if line.lower().startswith("model name")), cpu_model)
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": str(device), "timer": select_timer(device).name, "threads": torch.get_num_threads(),
            "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _timed_sections(config: BenchConfig, device: torch.device, index: int) -> Dict[str, List[dict]]:
    """One pass over the layer, training and inference timings."""
    if config.repeat > 1:
        log(f"timed pass {index + 1} of {config.repeat}")
    sections: Dict[str, List[dict]] = {"layers": bench_layers(config, device), "train": []}
    for batch in config.train_batches:
        sections["train"] += bench_train(config, batch, device)
        gc.collect()
    sections["infer"] = bench_infer(config, device)
    return sections


def run_benchmark(config: BenchConfig, device: torch.device) -> dict:
    """Every section of ``config``; returns the JSON-ready results, targets included."""
    started = time.perf_counter()
    results: dict = {"machine": machine_info(device), "config": dataclasses.asdict(config), "notes": []}
    load, cpus = results["machine"]["load_average"], results["machine"]["cpu_count"] or 1
    if load and device.type == "cpu" and load[0] > 0.5 * cpus:
        results["notes"].append(f"busy machine at start (1-min load {load[0]:.1f} on {cpus} CPUs): timings are "
                                f"noisy, only ratios measured side by side mean anything, and with several threads a "
                                f"descheduled thread stalls every parallel kernel (--threads 1 avoids that)")
    if config.name != "full":
        results["notes"].append(f"--{config.name} run: ResNet at {config.resolution} px with "
                                f"{config.train_rounds} train / {config.infer_rounds} inference rounds and "
                                f"{config.layer_rounds} layer rounds; the ResNet targets are defined at 224 px")
    log("op counts" + (" and kernel launches" if device.type == "cuda" else ""))
    results["ops"] = bench_ops(config, device)
    if device.type == "cuda" and any(row["kernels"] is None for row in results["ops"]):
        results["notes"].append("kernel launches not counted: this torch profiler cannot trace CUDA (no CUPTI)")
    passes = [_timed_sections(config, device, index) for index in range(config.repeat)]
    results.update(passes[0])
    results["repeats"] = passes[1:]
    results["repeat_agreement"] = repeat_agreement(passes)
    results["compiled_mabn_kernels"] = None
    if config.compile_kernels:
        log("torch.compile kernel count")
        try:
            results["compiled_mabn_kernels"] = compiled_mabn_kernels(config, device)
        except Exception as error:  # a missing C++ toolchain must not lose the measured numbers
            results["notes"].append(f"compiled kernel count skipped: {type(error).__name__}: {error}")
    else:
        results["notes"].append("compiled kernel count skipped in this run")
    results["targets"] = [t.as_dict() for t in evaluate_targets(results, config)]
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _x(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _on_cuda_events(rows: Sequence[dict]) -> bool:
    return any(row.get("timer") == CUDA_EVENT for row in rows)


def _calls(rows: Sequence[dict]) -> str:
    """``", CUDA events, 1-200 calls per sample"`` for a CUDA-event section, else nothing."""
    if not _on_cuda_events(rows):
        return ""
    low, high = min(row["repeats"] for row in rows), max(row["repeats"] for row in rows)
    return f", CUDA events, {low if low == high else f'{low}-{high}'} calls per sample"


def _ops_table(rows: Sequence[dict]) -> List[str]:
    """Dispatched operators per variant, with kernel launches when the rows have them (CUDA)."""
    if any(row.get("kernels") is not None for row in rows):
        lines = ["| variant | input | ops | of which views | kernels | kernels vs BN | kernels vs GN "
                 "| memcpy/memset |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        return lines + [f"| {r['variant']} | {_shape_str(r['shape'])} | {r['ops']} | {r['views']} | "
                        f"{'—' if r['kernels'] is None else r['kernels']} | {_x(r['kernels_vs_bn'])} | "
                        f"{_x(r['kernels_vs_gn'])} | {'—' if r['transfers'] is None else r['transfers']} |"
                        for r in rows]
    lines = ["| variant | input | ops | of which views |", "|---|---|---:|---:|"]
    return lines + [f"| {r['variant']} | {_shape_str(r['shape'])} | {r['ops']} | {r['views']} |" for r in rows]


def _repeat_lines(agreement: Optional[dict]) -> List[str]:
    """The largest ratio changes between the first timed pass and the repeats."""
    if agreement is None:
        return []
    judged = sorted((c for c in agreement["changes"] if c["judged"]), key=lambda c: -c["change"])
    context = max((c for c in agreement["changes"] if not c["judged"]), key=lambda c: c["change"], default=None)
    lines = ["", f"## Repeat: {agreement['passes']} passes over the timed sections", "",
             "The largest relative changes of a judged ratio between the first pass (reported above) and a repeat:",
             "", "| section | row | ratio | first | repeat | change |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {c['section']} | {c['row']} | {c['ratio']} | {c['first']:.3f} | {c['repeat']:.3f} | "
              f"{100 * c['change']:.1f}% |" for c in judged[:10]]
    if context is not None:
        lines += ["", f"Context rows (naive MABN, the copy) are not judged; the largest of their changes is "
                      f"{100 * context['change']:.1f}% ({context['row']}, {context['ratio']})."]
    return lines


def format_markdown(results: dict) -> str:
    """The report: markdown tables, notes, then one PASS/MISS line per target."""
    machine, config = results["machine"], results["config"]
    lines = [f"# MABN benchmark ({config['name']})", "",
             f"torch {machine['torch']}, {machine['device']}{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}, "
             f"{machine['threads']} threads, CPU {machine['cpu_model']}. Medians of rounds whose calls are "
             f"{'mixed and timed one by one' if config.get('calls', INTERLEAVED) == INTERLEAVED else 'run back to back per variant'}"
             f"; every ratio is the median of per-round ratios; copies = time / time of x.clone()."
             + (" Timed with CUDA events around k back-to-back calls per sample (time per call = sample / k)."
                if machine.get("timer") == CUDA_EVENT else ""), ""]
    on_cuda = any(r.get("kernels") is not None for r in results["ops"])
    lines += ["## Operators" + (" and GPU kernel launches" if on_cuda else "")
              + " per training forward + backward (one layer)", ""]
    lines += _ops_table(results["ops"])
    if not on_cuda and not machine["device"].startswith("cuda"):
        lines += ["", "Dispatched operators only: kernel launches exist only on CUDA (run with --device cuda)."]
    kernels = results.get("compiled_mabn_kernels")
    if kernels is not None:
        lines += ["", f"torch.compile (inductor), one MABN forward + backward: {kernels['fused']} fused kernels run "
                      f"({kernels['codegen']} loop kernels generated, counting vectorized and scalar variants)"]
    layers = results["layers"]
    k_column = _on_cuda_events(layers)
    lines += ["", f"## Layer forward + backward ({config['layer_rounds']} rounds{_calls(layers)})", "",
              "| shape | variant | median ms | vs BN | vs GN | copies | IQR |" + (" k |" if k_column else ""),
              "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if k_column else "")]
    lines += [f"| {_shape_str(r['shape'])} | {r['variant']} | {r['median_ms']:.3f} | {_x(r['ratio_to_bn'])} | "
              f"{_x(r['ratio_to_gn'])} | {r['copies']:.1f} | {r['iqr_pct']:.0f}% |"
              + (f" {r['repeats']} |" if k_column else "") for r in layers]
    train = results["train"]
    if train:
        lines += ["", f"## {train[0]['arch']} training step, {train[0]['resolution']} px "
                      f"({config['train_rounds']} rounds{_calls(train)})",
                  "", "| batch | variant | median ms | vs BN | vs GN | IQR | saved for backward MiB | saved vs BN |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['batch']} | {r['variant']}{'' if r['finite'] else ' (non-finite loss!)'} | "
                  f"{r['median_ms']:.1f} | {_x(r['ratio_to_bn'])} | {_x(r.get('ratio_to_gn'))} | "
                  f"{r['iqr_pct']:.0f}% | {r['saved_mib']:.1f} | {_x(r['saved_ratio_to_bn'])} |" for r in train]
    infer = results["infer"]
    if infer:
        lines += ["", f"## {infer[0]['arch']} inference (eval, no_grad), batch {infer[0]['batch']}, "
                      f"{infer[0]['resolution']} px ({config['infer_rounds']} rounds{_calls(infer)})", "",
                  "| variant | median ms | vs no norm | IQR |", "|---|---:|---:|---:|"]
        for r in infer:
            diff = f" (max rel diff to unfolded {r['max_rel_diff_to_unfolded']:.1e})" if "max_rel_diff_to_unfolded" in r else ""
            lines.append(f"| {r['variant']}{diff} | {r['median_ms']:.1f} | {_x(r['ratio_to_no_norm'])} | {r['iqr_pct']:.0f}% |")
    lines += _repeat_lines(results.get("repeat_agreement"))
    lines += [""] + [f"- note: {note}" for note in results["notes"]]
    lines += ["", f"## Targets ({config['name']} sizes)", ""]
    lines += [format_target(Target(**{k: v for k, v in t.items() if k != "passed"})) for t in results["targets"]]
    lines += ["", f"Total time {results['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, ResNet-50 at 112 px")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long smoke run for tests
    parser.add_argument("--json", metavar="PATH", help="write every number, the targets and machine info to PATH")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds of every section")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="passes over the timed sections (default 2; the first is reported, the others give "
                             "the ratios' repeat agreement)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument("--calls", choices=(INTERLEAVED, BACK_TO_BACK), default=INTERLEAVED,
                        help="how a round orders its calls: every variant's calls mixed and timed one by one "
                             "(default), or each variant's calls in a row (see benchmarks/harness.py)")
    args = parser.parse_args(argv)
    if args.quick and args.tiny:
        parser.error("--quick and --tiny exclude each other; pass one")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here; use --device cpu")
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(directory):
            parser.error(f"--json {args.json}: directory {directory} does not exist; create it first")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    config = TINY if args.tiny else QUICK if args.quick else FULL
    if args.rounds is not None:
        config = config.with_rounds(args.rounds)
    if args.repeat is not None:
        config = dataclasses.replace(config, repeat=args.repeat)
    config = dataclasses.replace(config, calls=args.calls)
    log(f"device {device}, {torch.get_num_threads()} threads, {config.name} run")
    results = run_benchmark(config, device)
    print(format_markdown(results), flush=True)
    if args.json:
        temporary = f"{args.json}.tmp"
        with open(temporary, "w") as handle:
            json.dump(results, handle, indent=2)
        os.replace(temporary, args.json)
        log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
