"""The norm layers of an earlier commit against the working tree's, measured side by side in one run.

Usage (from the repository root of a git checkout)::

    python -m benchmarks.before_after --before cb3cf30 --threads 1
    python -m benchmarks.before_after --before cb3cf30 --quick --json before_after.json

The ``mabn`` package of ``--before`` is extracted with ``git archive`` into a temporary folder
and imported next to the working tree's (its modules are renamed out of ``sys.modules`` after
the import; ``mabn.compile_barrier``, which registers a torch library op, is shared). Each
section then times both versions and the references in the same interleaved rounds
(:func:`benchmarks.harness.interleaved_times`), so every "before vs after" ratio pairs times of
the same rounds of one run (:func:`benchmarks.harness.paired_ratio`):

1. ``ops``: dispatched operators of one training forward + backward per layer (counts, no time);
2. ``layers``: one layer's forward + backward, MABN at B=2 (one group) and split at B=2, ghost BN
   and Batch Renorm at B=2, Batch Renorm with one group, against ``nn.BatchNorm2d`` and
   ``nn.GroupNorm``;
3. ``train``: the torchvision ResNet training step of :mod:`benchmarks.bench` with MABN+CenConv
   converted by each version's ``convert_norm``/``convert_conv``, against BN.

The repeat passes of :mod:`benchmarks.bench` apply here too: ``--repeat 2`` (the default) runs
the timed sections twice and reports the largest change of a ratio between the passes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from benchmarks.bench import REAL_B, _base_resnet, _inputs, layer_case, machine_info, train_case
from benchmarks.harness import (BACK_TO_BACK, INTERLEAVED, count_ops, interleaved_times, log, paired_ratio, relocate,
                                summarize)

__all__ = ["load_revision", "bench_ops", "bench_layers", "bench_train", "run", "format_markdown", "main"]

B = 2
SHARED_MODULES = ("mabn.compile_barrier",)   # registers the torch library op mabn::saved_for_backward once
LAYER_SHAPES = ((2, 64, 7, 7), (2, 256, 14, 14), (8, 32, 28, 28), (2, 256, 56, 56), (32, 16, 32, 32),
                (32, 64, 56, 56))
SPLIT_SHAPES = ((8, 32, 28, 28),)
GROUPED_SHAPES = ((32, 16, 32, 32), (32, 64, 56, 56))   # ghost BN and BRN: the bench's baseline shapes
LayerBuilder = Callable[[types.ModuleType, int], nn.Module]
LAYERS: Dict[str, LayerBuilder] = {
    "MABN": lambda pkg, c: pkg.MABN2d(c, B=B, real_B=REAL_B, warmup_iters=0, r_warmup_iters=0),
    "MABN split B=2": lambda pkg, c: pkg.MABN2d(c, B=B, real_B=REAL_B, warmup_iters=0, r_warmup_iters=0,
                                                split_batch=True),
    "ghost BN B=2": lambda pkg, c: pkg.GhostBatchNorm2d(c, B),
    "BRN B=2": lambda pkg, c: pkg.BatchRenorm2d(c, warmup_steps=0, B=B),
    "BRN": lambda pkg, c: pkg.BatchRenorm2d(c, warmup_steps=0),
}


def _extract_package(revision: str, folder: str) -> None:
    """``mabn/`` of ``revision`` into ``folder`` (``git archive``; the repository is the cwd's)."""
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", revision, "mabn"], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = error.stderr.decode().strip() if isinstance(error, subprocess.CalledProcessError) else str(error)
        raise SystemExit(f"--before {revision}: git archive failed ({detail}); run from a git checkout and name "
                         f"a commit that has mabn/")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")


@contextlib.contextmanager
def _isolated_mabn(folder: str) -> Iterator[None]:
    """While active, ``import mabn`` finds the package in ``folder``; afterwards every module of
    the working tree's ``mabn`` is back in ``sys.modules``."""
    own = {name: module for name, module in sys.modules.items() if name == "mabn" or name.startswith("mabn.")}
    for name in own:
        if name not in SHARED_MODULES:
            del sys.modules[name]
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for name in [n for n in sys.modules if n == "mabn" or n.startswith("mabn.")]:
            del sys.modules[name]
        sys.modules.update(own)


def load_revision(revision: str, folder: str) -> types.ModuleType:
    """The ``mabn`` package of ``revision``, imported under isolation (see the module docstring)."""
    import mabn  # noqa: F401  (the working tree's package must be loaded before it is set aside)
    import mabn.compile_barrier  # noqa: F401

    _extract_package(revision, folder)
    with _isolated_mabn(folder):
        package = importlib.import_module("mabn")
        for name in ("convert", "cen_conv", "moving_average_bn", "ghost_batchnorm", "batch_renorm"):
            importlib.import_module(f"mabn.{name}")
    return package


def bench_ops(versions: Dict[str, types.ModuleType]) -> List[dict]:
    """Dispatched operators of one training step per layer and version, at (2, 64, 7, 7) (the
    grouped layers at batch 4: two groups of B=2), after one warm-up step."""
    rows = []
    for variant, build in LAYERS.items():
        shape = (4, 64, 7, 7) if variant in ("MABN split B=2", "ghost BN B=2", "BRN B=2") else (2, 64, 7, 7)
        row = {"variant": variant, "shape": list(shape)}
        for version, package in versions.items():
            case = layer_case(build(package, shape[1]).train(), *_inputs(shape, torch.device("cpu")))
            case.prepare()
            case.run()
            counter = count_ops(case)
            row[version] = {"ops": counter.total, "views": counter.views}
        rows.append(row)
    return rows


def _ratios(times: Mapping[str, Sequence[float]], reference: str) -> Dict[str, float]:
    return {name: paired_ratio(seconds, times[reference]) for name, seconds in times.items()}


def bench_layers(versions: Dict[str, types.ModuleType], rounds: int, warmup: int, calls: str = INTERLEAVED
                 ) -> List[dict]:
    """Per shape: BN, GN and each layer of each version in the same rounds (the input moved to new
    memory before each, :func:`benchmarks.harness.relocate`); ratios to BN."""
    rows = []
    for shape in LAYER_SHAPES:
        x, grad = _inputs(shape, torch.device("cpu"))
        layers: Dict[str, nn.Module] = {"BN": nn.BatchNorm2d(shape[1]),
                                        "GN": nn.GroupNorm(32 if shape[1] % 32 == 0 else shape[1], shape[1])}
        variants = (["MABN"] + (["MABN split B=2"] if shape in SPLIT_SHAPES else [])
                    + (["ghost BN B=2", "BRN B=2", "BRN"] if shape in GROUPED_SHAPES else []))
        for variant in variants:
            for version, package in versions.items():
                layers[f"{variant} {version}"] = LAYERS[variant](package, shape[1])
        cases = {name: layer_case(layer.train(), x, grad) for name, layer in layers.items()}
        times = interleaved_times(cases, rounds, warmup, torch.device("cpu"), label=f"layers {shape}", calls=calls,
                                  refresh=lambda: relocate(x, grad))
        medians = {name: summarize(t)["median_ms"] for name, t in times.items()}
        rows.append({"shape": list(shape), "median_ms": medians,
                     "iqr_pct": {name: summarize(t)["iqr_pct"] for name, t in times.items()},
                     "ratio_to_bn": _ratios(times, "BN"), "ratio_to_gn": _ratios(times, "GN")})
    return rows


def bench_train(versions: Dict[str, types.ModuleType], arch: str, resolution: int, batch: int, rounds: int,
                warmup: int, calls: str = INTERLEAVED) -> dict:
    """The ResNet training step with BN and with each version's MABN+CenConv, in the same rounds."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution)
    labels = torch.randint(0, 1000, (batch,))
    base = _base_resnet(arch)
    models = {"BN": copy.deepcopy(base)}
    for version, package in versions.items():
        converted = package.convert_norm(copy.deepcopy(base), "MABN", B=batch, real_B=REAL_B, warmup_iters=0)
        models[f"MABN+CenConv {version}"] = package.convert_conv(converted, "CenConv")
    cases = {name: train_case(model.train(), images, labels) for name, model in models.items()}
    times = interleaved_times(cases, rounds, warmup, torch.device("cpu"), label=f"{arch} b{batch} {resolution}px",
                              calls=calls)
    medians = {name: summarize(t)["median_ms"] for name, t in times.items()}
    return {"arch": arch, "resolution": resolution, "batch": batch, "median_ms": medians,
            "iqr_pct": {name: summarize(t)["iqr_pct"] for name, t in times.items()},
            "ratio_to_bn": _ratios(times, "BN")}


def _largest_change(first: dict, later: dict) -> float:
    """The largest relative change of a ratio to BN between two passes."""
    pairs = [(a["ratio_to_bn"], b["ratio_to_bn"]) for a, b in zip(first["layers"], later["layers"])]
    pairs.append((first["train"]["ratio_to_bn"], later["train"]["ratio_to_bn"]))
    return max(abs(b[name] / a[name] - 1.0) for a, b in pairs for name in a if name != "BN")


def run(revision: str, quick: bool, repeat: int, calls: str = INTERLEAVED) -> dict:
    """Every section; ``versions`` are "before" (``revision``) and "after" (the working tree)."""
    import mabn

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mabn-before-") as folder:
        versions = {"before": load_revision(revision, folder), "after": mabn}
        rounds, warmup = (15, 3) if quick else (40, 5)
        resolution, train_rounds = (112, 6) if quick else (224, 10)
        results: dict = {"machine": machine_info(torch.device("cpu")), "before": revision, "calls": calls,
                         "after": _head_description(), "ops": bench_ops(versions), "passes": []}
        for index in range(repeat):
            log(f"timed pass {index + 1} of {repeat}")
            results["passes"].append({"layers": bench_layers(versions, rounds, warmup, calls),
                                      "train": bench_train(versions, "resnet50", resolution, 2, train_rounds, 2,
                                                           calls)})
    results["largest_repeat_change"] = (max(_largest_change(results["passes"][0], later)
                                            for later in results["passes"][1:]) if repeat > 1 else None)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _head_description() -> str:
    """``git describe``-like name of the working tree: the HEAD commit, ``-dirty`` when modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "working tree"
    return head + ("-dirty" if dirty else "")


def _x(value: float) -> str:
    return f"{value:.2f}x"


def format_markdown(results: dict) -> str:
    """Tables of the first pass, the op counts and the repeat agreement."""
    machine, first = results["machine"], results["passes"][0]
    lines = [f"# Before ({results['before']}) and after ({results['after']})", "",
             f"torch {machine['torch']}, {machine['threads']} threads, CPU {machine['cpu_model']} "
             f"({machine['cpu_count']} cores, 1-min load {machine['load_average'][0]:.2f} at start), "
             f"{machine['time']}. Calls of a round: {results.get('calls', INTERLEAVED)}.", "",
             "## Dispatched operators per training forward + backward", "",
             "| layer | input | before | after |", "|---|---|---:|---:|"]
    for row in results["ops"]:
        before, after = row["before"], row["after"]
        lines.append(f"| {row['variant']} | {'x'.join(map(str, row['shape']))} | {before['ops']} "
                     f"({before['views']} views) | {after['ops']} ({after['views']} views) |")
    lines += ["", "## Layer forward + backward, ratio to BN (same rounds)", "",
              "| input | layer | before vs BN | after vs BN | after vs GN | after / before |", "|---|---|---:|---:|---:|---:|"]
    for row in first["layers"]:
        ratio, to_gn = row["ratio_to_bn"], row["ratio_to_gn"]
        for variant in LAYERS:
            if f"{variant} after" in ratio:
                lines.append(f"| {'x'.join(map(str, row['shape']))} | {variant} | {_x(ratio[variant + ' before'])} | "
                             f"{_x(ratio[variant + ' after'])} | {_x(to_gn[variant + ' after'])} | "
                             f"{_x(ratio[variant + ' after'] / ratio[variant + ' before'])} |")
    train = first["train"]
    lines += ["", f"## {train['arch']} training step, batch {train['batch']}, {train['resolution']} px", "",
              "| variant | median ms | vs BN |", "|---|---:|---:|"]
    lines += [f"| {name} | {train['median_ms'][name]:.1f} | {_x(train['ratio_to_bn'][name])} |"
              for name in train["median_ms"]]
    change = results["largest_repeat_change"]
    if change is not None:
        lines += ["", f"Largest change of a ratio to BN between the {len(results['passes'])} passes: {100 * change:.1f}%."]
    lines += ["", f"Total time {results['elapsed_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.before_after", description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, ResNet-50 at 112 px")
    parser.add_argument("--repeat", type=int, default=2, help="passes over the timed sections (default 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--json", metavar="PATH", help="write every number to PATH")
    parser.add_argument("--calls", choices=(INTERLEAVED, BACK_TO_BACK), default=INTERLEAVED,
                        help="how a round orders its calls (see benchmarks/harness.py)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(args.before, args.quick, args.repeat, args.calls)
    print(format_markdown(results), flush=True)
    if args.json:
        with open(f"{args.json}.tmp", "w") as handle:
            json.dump(results, handle, indent=2)
        os.replace(f"{args.json}.tmp", args.json)
    return results


if __name__ == "__main__":
    main()
