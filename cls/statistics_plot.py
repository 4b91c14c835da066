"""Figures of ``--record_statistics`` runs: statistic against iteration, one line per batch size.

``python scripts/plot_statistics.py RUN_A RUN_B --out DIR`` where each RUN is a statistics folder
(``<save>/statistics/bs_2``) or a run's ``--save`` directory (all its ``statistics/bs_*`` folders
are used). For each chosen layer, each statistic (mu_B, sigma2_B, g_B, Psi_B) and each series
(the logged channel and the mean absolute value over channels) one PNG is written:
``<layer>_<statistic>_<series>.png``, like the figures of the paper (Statistics.md of the
published code).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from cls.bn_statistics import STATISTICS

__all__ = ["find_statistics_dirs", "load_scalars", "run_label", "plot_runs", "main"]

Series = Tuple[List[int], List[float]]


def _has_events(directory: str) -> bool:
    return any(name.startswith("events.out.tfevents") for name in os.listdir(directory))


def find_statistics_dirs(path: str) -> List[str]:
    """The statistics folders under ``path`` (itself, ``path/bs_*`` or ``path/statistics/bs_*``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if _has_events(path):
        return [path]
    for parent in (os.path.join(path, "statistics"), path):
        if os.path.isdir(parent):
            found = sorted(os.path.join(parent, d) for d in os.listdir(parent)
                           if d.startswith("bs_") and os.path.isdir(os.path.join(parent, d))
                           and _has_events(os.path.join(parent, d)))
            if found:
                return found
    raise FileNotFoundError(f"{path}: no TensorBoard statistics found (expected event files in it, "
                            f"in {path}/bs_* or in {path}/statistics/bs_*)")


def load_scalars(directory: str) -> Dict[str, Series]:
    """All scalar series of the event files in ``directory``, tag -> (steps, values), in tag order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(directory, size_guidance={SCALARS: 0})
    accumulator.Reload()
    series: Dict[str, Series] = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        series[tag] = ([e.step for e in events], [e.value for e in events])
    return series


def run_label(directory: str) -> str:
    """``bs_2`` -> ``batch 2``; ``bs_32_nb2`` -> ``batch 32, norm batch 2``."""
    name = os.path.basename(os.path.normpath(directory))
    match = re.fullmatch(r"bs_(\d+)(?:_nb(\d+))?", name)
    if not match:
        return name
    return f"batch {match.group(1)}" + (f", norm batch {match.group(2)}" if match.group(2) else "")


def _layers(series: Dict[str, Series]) -> List[str]:
    layers: List[str] = []
    for tag in series:
        parts = tag.rsplit("/", 2)
        if len(parts) == 3 and parts[1] in STATISTICS and parts[0] not in layers:
            layers.append(parts[0])
    return layers


def _smooth(values: List[float], weight: float) -> List[float]:
    if weight <= 0:
        return values
    out, last = [], values[0] if values else 0.0
    for value in values:
        last = weight * last + (1.0 - weight) * value
        out.append(last)
    return out


def plot_runs(run_dirs: Sequence[str], out_dir: str, layers: Optional[Sequence[str]] = None,
              all_layers: bool = False, smooth: float = 0.0) -> List[str]:
    """Write the PNGs for ``run_dirs`` (statistics folders) into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_label(d), load_scalars(d)) for d in run_dirs]
    common = [layer for layer in _layers(runs[0][1]) if all(layer in _layers(s) for _, s in runs[1:])]
    if not common:
        raise ValueError("the runs share no recorded layer")
    if layers:
        missing = [layer for layer in layers if layer not in common]
        if missing:
            raise ValueError(f"layers not recorded in every run: {', '.join(missing)}; available: {', '.join(common)}")
        chosen = list(layers)
    else:
        chosen = common if all_layers else common[:1]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for layer in chosen:
        for stat in STATISTICS:
            kinds = sorted({tag.rsplit("/", 1)[1] for _, s in runs for tag in s if tag.startswith(f"{layer}/{stat}/")})
            for kind in kinds:
                figure, axes = plt.subplots(figsize=(8, 4.5))
                for label, series in runs:
                    tag = f"{layer}/{stat}/{kind}"
                    if tag in series:
                        steps, values = series[tag]
                        axes.plot(steps, _smooth(values, smooth), label=label, linewidth=0.8)
                what = "mean |.| over channels" if kind == "mean_abs" else kind.replace("channel", "channel ")
                axes.set_title(f"{stat} of {layer} ({what})")
                axes.set_xlabel("iteration")
                axes.set_ylabel(stat)
                axes.grid(alpha=0.3)
                axes.legend()
                figure.tight_layout()
                path = os.path.join(out_dir, f"{layer.replace('.', '_')}_{stat}_{kind}.png")
                figure.savefig(path, dpi=100)
                plt.close(figure)
                written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="plot_statistics.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="statistics folders or --save directories of runs")
    parser.add_argument("--out", required=True, help="output directory for the PNG files")
    parser.add_argument("--layer", action="append", default=None, help="layer name (repeatable); default: the first")
    parser.add_argument("--all_layers", action="store_true", help="plot every recorded layer")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing weight in [0, 1)")
    args = parser.parse_args(argv)
    try:
        run_dirs = [d for run in args.runs for d in find_statistics_dirs(run)]
        written = plot_runs(run_dirs, args.out, args.layer, args.all_layers, args.smooth)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} figures to {args.out}")
    return 0
