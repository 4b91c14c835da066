"""The result figures of a reproduction run: classification error per row, error against the
normalization batch (``--full``) and detection AP per norm, each mean ± sd over seeds with every
seed's value drawn as a point."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

__all__ = ["FIGURES", "bars_with_seeds", "classification_figure", "sweep_figure", "detection_figure"]

FIGURES = "figures"
POINT_COLOR = "#222222"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars_with_seeds(axis, labels: Sequence[str], per_seed: Sequence[Sequence[float]], color: str,
                    offset: float = 0.0, width: float = 0.8, label: Optional[str] = None) -> None:
    """Bars of the means with sd error bars (none with one seed) and each seed's value as a point."""
    import statistics

    positions = [index + offset for index in range(len(labels))]
    means = [statistics.fmean(values) for values in per_seed]
    errors = [statistics.stdev(values) if len(values) >= 2 else 0.0 for values in per_seed]
    axis.bar(positions, means, width, yerr=errors, capsize=4, color=color, alpha=0.85, label=label)
    for position, values in zip(positions, per_seed):
        spread = [position + width * 0.5 * (i - (len(values) - 1) / 2) / max(len(values), 1) for i in range(len(values))]
        axis.scatter(spread, values, s=12, color=POINT_COLOR, zorder=3)


def _save(figure, out: str, name: str) -> str:
    path = os.path.join(out, FIGURES, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return os.path.join(FIGURES, name)


def classification_figure(table: Sequence[dict], network: str, iterations: int, out: str) -> str:
    """Top-1 error of the table's rows (``summary`` items of the report); returns the path in ``out``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    bars_with_seeds(axis, [item["key"] for item in table], [item["top1"] for item in table], "#4c72b0")
    axis.set_xticks(range(len(table)), [item["key"] for item in table])
    axis.set_ylabel("top-1 error (%)")
    seeds = max(len(item["top1"]) for item in table)
    axis.set_title(f"{network}, embedded data, {iterations} iterations; mean ± sd over {seeds} seed(s), "
                   f"points: seeds", fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    return _save(figure, out, "classification.png")


def sweep_figure(sweep: Sequence[dict], network: str, out: str) -> str:
    """Top-1 error against the normalization batch for BN, BRN and MABN (the ``top1_err`` mean and sd
    of each ``summary`` item), sd error bars."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for norm in ("bn", "brn", "mabn"):
        items = sorted((item for item in sweep if item["norm"] == norm), key=lambda item: item["norm_batch"])
        if items:
            errors = [i["top1_err"]["std"] or 0.0 for i in items]
            axis.errorbar([i["norm_batch"] for i in items], [i["top1_err"]["mean"] for i in items], yerr=errors,
                          marker="o", capsize=3, label=norm.upper())
    axis.set_xscale("log", base=2)
    axis.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    axis.set_xlabel("normalization batch")
    axis.set_ylabel("top-1 error (%)")
    axis.set_title(f"Error vs normalization batch ({network}, embedded data)")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, out, "error_vs_norm_batch.png")


def detection_figure(summary: Sequence[dict], names: Sequence[str], out: str) -> Optional[str]:
    """Box and mask AP per norm (``summary`` items with per-seed ``bbox_AP`` / ``segm_AP`` lists);
    None when no norm has a result."""
    rows = [(name, item) for name, item in zip(names, summary) if item["bbox_AP"]]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    labels: List[str] = [name for name, _ in rows]
    bars_with_seeds(axis, labels, [item["bbox_AP"] for _, item in rows], "#4c72b0", -0.2, 0.4, "box AP")
    bars_with_seeds(axis, labels, [item["segm_AP"] for _, item in rows], "#dd8452", 0.2, 0.4, "mask AP")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_ylabel("AP (%)")
    axis.set_title("Tiny Mask R-CNN on the embedded shapes; mean ± sd over seeds, points: seeds", fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    return _save(figure, out, "detection_ap.png")
