"""The batch-statistics figure: mu_B, sigma^2_B, g_B and Psi_B of one BN layer, batch 2 vs 32.

Two ``python -m cls.train --norm bn --record_statistics`` runs (the published recipe, ResNet-20
on the embedded data) record every BN layer; ``cls.statistics_plot`` draws one PNG per
statistic, and :func:`plot_grid` puts the four statistics of one layer side by side, above a
panel of each statistic's fluctuation over the iterations (:func:`fluctuation`) per run, on a
log scale: the paper's point is that the backward statistics fluctuate far more at batch 2.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Sequence

from cls.bn_statistics import STATISTICS

__all__ = ["STAT_BATCHES", "PREFERRED_LAYER", "statistics_command", "statistics_folder", "fluctuation", "plot_grid",
           "summarize_runs"]

STAT_BATCHES = (2, 32)
PREFERRED_LAYER = "layer2.0.bn1"
SERIES = "channel0"


def statistics_command(batch: int, iterations: int, save: str, data_flags: List[str]) -> List[str]:
    """Plain BN over the whole SGD batch ``batch``, statistics of every BN layer at every iteration."""
    return [sys.executable, "-m", "cls.train", "--arch", "resnet20", "--image_size", "32", "--dataset", "synthetic",
            "--norm", "bn", "--batch_size", str(batch), "--iters_per_epoch", str(iterations), "--total_epoch", "1",
            "--lr_milestones", "--learning_rate", "0.05", "--record_statistics", "--stat_interval", "1",
            "--val_batch_size", "250", "--eval_interval", "0", "--workers", "0", "--seed", "0", "--device", "cpu",
            "--no-progress", "--save", save, *data_flags]


def _choose_layer(runs: Sequence[Dict[str, tuple]]) -> str:
    layers = [tag.split("/")[0] for tag in runs[0] if tag.endswith(f"/{STATISTICS[0]}/{SERIES}")]
    common = [layer for layer in layers if all(f"{layer}/{STATISTICS[0]}/{SERIES}" in run for run in runs[1:])]
    if not common:
        raise ValueError("the statistics runs share no recorded layer")
    return PREFERRED_LAYER if PREFERRED_LAYER in common else common[0]


def fluctuation(values: Sequence[float]) -> float:
    """Standard deviation over iterations divided by the mean absolute value (inf when that is 0)."""
    import statistics

    scale = statistics.fmean(abs(value) for value in values)
    return statistics.pstdev(values) / scale if scale > 0 else float("inf")


def _fluctuation_panel(axis, runs: Sequence[Dict[str, tuple]], labels: Sequence[str], layer: str) -> None:
    """Grouped bars: one group per statistic, one bar per run, log y."""
    width = 0.8 / len(runs)
    for index, (label, series) in enumerate(zip(labels, runs)):
        heights = [fluctuation(series[f"{layer}/{stat}/{SERIES}"][1]) for stat in STATISTICS]
        axis.bar([position + (index - (len(runs) - 1) / 2) * width for position in range(len(STATISTICS))],
                 heights, width, label=label)
    axis.set_xticks(range(len(STATISTICS)), list(STATISTICS))
    axis.set_yscale("log")
    axis.set_ylabel("sd / mean |value|")
    axis.set_title(f"fluctuation over iterations ({layer}, channel 0)")
    axis.grid(axis="y", alpha=0.3, which="both")
    axis.legend()


def plot_grid(run_dirs: Sequence[str], labels: Sequence[str], path: str) -> str:
    """One PNG with the four statistics (channel 0) of one layer against the iteration and their
    fluctuation per run; returns the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cls.statistics_plot import load_scalars

    runs = [load_scalars(directory) for directory in run_dirs]
    layer = _choose_layer(runs)
    figure = plt.figure(figsize=(11, 10.5))
    grid = figure.add_gridspec(3, 2)
    for index, stat in enumerate(STATISTICS):
        axis = figure.add_subplot(grid[index // 2, index % 2])
        for label, series in zip(labels, runs):
            steps, values = series[f"{layer}/{stat}/{SERIES}"]
            axis.plot(steps, values, label=label, linewidth=0.8)
        axis.set_title(f"{stat} ({layer}, channel 0)")
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
        axis.legend()
    _fluctuation_panel(figure.add_subplot(grid[2, :]), runs, labels, layer)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return layer


def summarize_runs(run_dirs: Sequence[str], labels: Sequence[str], layer: str) -> Dict[str, Dict[str, dict]]:
    """Per run and statistic of ``layer`` (channel 0): mean, standard deviation, min, max and
    :func:`fluctuation` over iterations."""
    import statistics

    from cls.statistics_plot import load_scalars

    summary: Dict[str, Dict[str, dict]] = {}
    for label, directory in zip(labels, run_dirs):
        series = load_scalars(directory)
        summary[label] = {}
        for stat in STATISTICS:
            values = series[f"{layer}/{stat}/{SERIES}"][1]
            summary[label][stat] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
                                    "min": min(values), "max": max(values), "fluctuation": fluctuation(values),
                                    "points": len(values)}
    return summary


def statistics_folder(save: str) -> str:
    """The one ``statistics/bs_*`` folder of a ``--record_statistics`` run."""
    from cls.statistics_plot import find_statistics_dirs

    return find_statistics_dirs(save)[0]


