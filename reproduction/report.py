"""Gather the numbers of a reproduction run and write ``results.json``, ``results.md`` and figures."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Dict, List, Mapping, Optional, Sequence

from mabn.utils.checkpoint import write_text_atomic

__all__ = ["collect", "write_outputs", "versions"]

FIGURES = "figures"
MAX_DRAWN_NOTE = "highest-scoring detections per image, up to 8,"
DRAW_THRESHOLDS = (0.5, 0.3, 0.1)
DISPLAY_NAMES = {"bn": "BN", "brn": "BRN", "gn": "GN", "mabn": "MABN", "syncbn": "SyncBN"}


def versions() -> Dict[str, Optional[str]]:
    """Python, torch, torchvision, numpy and the repository's git commit (``+dirty`` with local changes)."""
    import numpy
    import torch
    import torchvision

    from reproduction.detection import REPO_ROOT

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "git_commit": commit}


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) >= 2 else None,
            "n": len(values)}


def _classification(plan, results, budget) -> dict:
    from reproduction.classification import PAPER_TOP1, cls_schedule_flags, read_final_metrics

    runs, failures = [], []
    for run in plan.cls_runs:
        name = f"cls {run['key']} seed {run['seed']}"
        status = results.get(name)
        numbers = read_final_metrics(run["folder"])
        entry = dict(run, returncode=None if status is None else status.returncode,
                     seconds=None if status is None else status.seconds, **(numbers or {}))
        runs.append(entry)
        if numbers is None or status is None or status.returncode != 0:
            log = status.log_path if status else "-"
            failures.append(f"{name}: no result (exit status {entry['returncode']}, log {log})")
    summary: Dict[str, dict] = {}
    for run in runs:
        if "top1_err" not in run:
            continue
        item = summary.setdefault(run["key"], {"key": run["key"], "norm": run["norm"], "norm_batch": run["norm_batch"],
                                               "in_table": run["in_table"], "top1": [], "top5": [], "seeds": []})
        item["top1"].append(run["top1_err"])
        item["top5"].append(run["top5_err"])
        item["seeds"].append(run["seed"])
    for item in summary.values():
        item["top1_err"] = _mean_std(item["top1"])
        item["top5_err"] = _mean_std(item["top5"])
        item["paper_top1_err"] = PAPER_TOP1.get(item["key"])
    schedules = {norm: cls_schedule_flags(norm, budget.cls_iters) for norm in ("brn", "mabn")}
    return {"runs": runs, "summary": list(summary.values()), "schedules": schedules, "failures": failures}


def _speed(plan, results) -> Optional[dict]:
    if plan.speed_json is None:
        return None
    if not os.path.isfile(plan.speed_json):
        status = results.get("inference speed")
        return {"failure": f"inference speed: no result (log {status.log_path if status else '-'})"}
    with open(plan.speed_json, encoding="utf-8") as handle:
        return json.load(handle)


def _statistics(plan, results, out: str) -> Optional[dict]:
    from reproduction.statistics import plot_grid, statistics_folder, summarize_runs

    if not plan.stat_runs:
        return None
    labels = [f"batch {run['batch']}" for run in plan.stat_runs]
    try:
        folders = [statistics_folder(run["folder"]) for run in plan.stat_runs]
        figure = os.path.join(out, FIGURES, "statistics.png")
        layer = plot_grid(folders, labels, figure)
        from cls.statistics_plot import plot_runs

        per_statistic = plot_runs(folders, os.path.join(out, FIGURES, "statistics"), layers=[layer])
        return {"layer": layer, "figure": os.path.relpath(figure, out),
                "figures": [os.path.relpath(p, out) for p in per_statistic],
                "summary": summarize_runs(folders, labels, layer)}
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return {"failure": f"statistics: {exc}"}


def _detection(plan, results, out: str) -> Optional[dict]:
    from reproduction.detection import draw_predictions, norm_schedule, read_coco_results

    if not plan.det_runs:
        return None
    rows = []
    for run in plan.det_runs:
        status = results.get(f"det {run['norm']}")
        metrics = read_coco_results(run["folder"])
        row = {"norm": run["norm"], "processes": run["processes"], "iterations": run["iterations"],
               "schedule": norm_schedule(run["norm"], run["iterations"]),
               "returncode": None if status is None else status.returncode,
               "seconds": None if status is None else status.seconds, "metrics": metrics}
        if metrics is None:
            row["failure"] = f"det {run['norm']}: no COCO results (log {status.log_path if status else '-'})"
        rows.append(row)
    drawing = None
    drawn = next((r for r in rows if r["norm"] == "mabn" and r["metrics"] is not None), None)
    if drawn is not None:
        path = os.path.join(out, FIGURES, "detection_mabn_predictions.png")
        try:
            run = next(run for run in plan.det_runs if run["norm"] == "mabn")
            drawing = dict(draw_predictions("mabn", run["iterations"], os.path.abspath(run["folder"]), path,
                                            thresholds=DRAW_THRESHOLDS), figure=os.path.relpath(path, out))
        except (OSError, RuntimeError, ValueError) as exc:
            drawing = {"failure": f"drawing the predictions: {exc}"}
    return {"rows": rows, "drawing": drawing}


def _figures(report: dict, out: str) -> None:
    """Bar chart of the classification table; error against normalization batch when swept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in report["classification"]["summary"]] if report.get("classification") else []
    table = [s for s in summary if s["in_table"]]
    if table:
        figure, axis = plt.subplots(figsize=(7, 4))
        means = [s["top1_err"]["mean"] for s in table]
        errors = [s["top1_err"]["std"] or 0.0 for s in table]
        axis.bar([s["key"] for s in table], means, yerr=errors, capsize=4, color="#4c72b0")
        axis.set_ylabel("top-1 error (%)")
        axis.set_title(f"ResNet-20, embedded data, {report['budget']['cls_iters']} iterations")
        axis.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(os.path.join(out, FIGURES, "classification.png"), dpi=100)
        plt.close(figure)
        report["classification"]["figure"] = os.path.join(FIGURES, "classification.png")
    sweep = [s for s in summary if s["norm"] in ("bn", "brn", "mabn")]
    if report["budget"]["sweep"] and sweep:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for norm in ("bn", "brn", "mabn"):
            points = sorted((s["norm_batch"], s["top1_err"]["mean"], s["top1_err"]["std"] or 0.0)
                            for s in sweep if s["norm"] == norm)
            if points:
                axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                              marker="o", capsize=3, label=norm.upper())
        axis.set_xscale("log", base=2)
        axis.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        axis.set_xlabel("normalization batch")
        axis.set_ylabel("top-1 error (%)")
        axis.set_title("Error vs normalization batch (ResNet-20, embedded data)")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(out, FIGURES, "error_vs_norm_batch.png"), dpi=100)
        plt.close(figure)
        report["classification"]["sweep_figure"] = os.path.join(FIGURES, "error_vs_norm_batch.png")


def collect(plan, results, budget, args, started_at: str, wall_time_s: float) -> dict:
    """Every number of the run as one JSON-ready dict (figures are drawn on the way)."""
    import dataclasses

    import torch

    from benchmarks.bench import machine_info
    from reproduction.claims import check_claims, margin
    from reproduction.schedules import BRN_SCHEDULE, MABN_CLS_SCHEDULE, MABN_DET_SCHEDULE

    out = args.out
    os.makedirs(os.path.join(out, FIGURES), exist_ok=True)
    report: dict = {"mode": budget.name, "budget": dataclasses.asdict(budget), "command_line": getattr(args, "argv", None),
                    "started": started_at, "machine": machine_info(torch.device("cpu")), "versions": versions(),
                    "jobs": args.jobs, "threads_per_run": 1, "load_at_start": getattr(args, "load_at_start", None), "notes": list(plan.notes), "failures": []}
    report["published_schedules"] = [
        {"method": s.method, "source": s.source, "run_length": s.run_length, "iterations": dict(s.iterations),
         "fractions": s.fractions()} for s in (BRN_SCHEDULE, MABN_CLS_SCHEDULE, MABN_DET_SCHEDULE)]
    report["cls_val_images"] = 16 * (args.val_per_class or 100)
    report["tasks"] = {name: {"returncode": r.returncode, "seconds": r.seconds, "log": os.path.relpath(r.log_path, out)}
                       for name, r in results.items()}
    report["classification"] = _classification(plan, results, budget) if plan.cls_runs else None
    report["speed"] = _speed(plan, results)
    report["statistics"] = _statistics(plan, results, out)
    report["detection"] = _detection(plan, results, out)
    top1, per_seed = {}, {}
    if report["classification"]:
        report["failures"] += report["classification"]["failures"]
        for item in report["classification"]["summary"]:
            if item["in_table"]:
                top1[item["key"]] = item["top1_err"]["mean"]
                per_seed[item["key"]] = item["top1"]
    speed_ratio = None
    if report["speed"] and "rows" in report["speed"]:
        speed_ratio = next(r["ratio_to_bn"] for r in report["speed"]["rows"] if r["variant"] == "MABN folded")
    for part in ("speed", "statistics"):
        if report[part] and "failure" in report[part]:
            report["failures"].append(report[part]["failure"])
    if report["detection"]:
        report["failures"] += [r["failure"] for r in report["detection"]["rows"] if "failure" in r]
        if report["detection"]["drawing"] and "failure" in report["detection"]["drawing"]:
            report["failures"].append(report["detection"]["drawing"]["failure"])
    report["claims_margin"] = margin(per_seed) if per_seed else None
    report["claims"] = check_claims(top1, per_seed, speed_ratio)
    _figures(report, out)
    report["wall_time_s"] = wall_time_s
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean_pm(stat: Mapping[str, Optional[float]]) -> str:
    return _fmt(stat["mean"]) + (f" ± {stat['std']:.2f}" if stat.get("std") is not None else "")


def _markdown(report: dict) -> str:
    """results.md: the run's header, the claims, then one section per part that ran."""
    sections = (_header_section, _claims_section, _classification_section, _speed_section, _statistics_section,
                _detection_section, _schedules_and_runs_section)
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _header_section(report: dict) -> List[str]:
    """Title, machine, versions, timing, notes and failures."""
    machine, versions_ = report["machine"], report["versions"]
    lines: List[str] = [f"# MABN miniature reproduction ({report['mode']})", ""]
    start_load = report.get("load_at_start")
    load = (f", 1-min load {start_load:.1f} at the start and {machine['load_average'][0]:.1f} at the end"
            if start_load is not None and machine.get("load_average") else "")
    lines += [f"- machine: {machine.get('cpu_model')} ({machine.get('cpu_count')} CPUs{load}), {report['jobs']} runs "
              f"at once, 1 thread each",
              f"- versions: Python {versions_['python']}, torch {versions_['torch']}, torchvision "
              f"{versions_['torchvision']}, numpy {versions_['numpy']}, commit {versions_['git_commit']}",
              f"- started {report['started']}, finished {report['finished']}, wall time "
              f"{report['wall_time_s'] / 60:.1f} min", ""]
    for note in report["notes"]:
        lines += [f"> note: {note}", ""]
    if report["failures"]:
        lines += ["**Failures:**", ""] + [f"- {failure}" for failure in report["failures"]] + [""]

    return lines


def _claims_section(report: dict) -> List[str]:
    lines: List[str] = []
    lines += ["## Paper claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in report["claims"]]
    lines += ["", "A difference counts when it exceeds the margin: the larger of 2 points and twice the pooled "
                  "seed-to-seed standard deviation (when several seeds ran).", ""]

    return lines


def _classification_section(report: dict) -> List[str]:
    from reproduction.classification import EPOCHS, LEARNING_RATE, LR_MILESTONES, SGD_BATCH

    budget = report["budget"]
    lines: List[str] = []
    cls = report["classification"]
    if cls:
        lines += ["## Classification (embedded data, ResNet-20)", "",
                  f"ResNet-20 at 32 px on the embedded 16-class dataset, SGD batch {SGD_BATCH} in one process, "
                  f"{budget['cls_iters']} iterations ({EPOCHS} epochs of {budget['cls_iters'] // EPOCHS}), learning rate "
                  f"{LEARNING_RATE} x0.1 after epochs {LR_MILESTONES[0]} and {LR_MILESTONES[1]}, seeds "
                  f"{', '.join(map(str, budget['seeds']))}; the same for every row. Errors in % on the "
                  f"{report['cls_val_images']} validation images"
                  f"{' (mean ± standard deviation over seeds)' if len(budget['seeds']) > 1 else ''}.", "",
                  "| Norm batch | Norm | Top-1 err | Top-5 err | paper Top-1 err (ResNet-50, ImageNet) |",
                  "|---|---|---|---|---|"]
        for item in cls["summary"]:
            if item["in_table"]:
                batch = "—¹" if item["norm_batch"] is None else str(item["norm_batch"])
                lines.append(f"| {batch} | {item['norm'].upper()} | {_mean_pm(item['top1_err'])} | "
                             f"{_mean_pm(item['top5_err'])} | {_fmt(item['paper_top1_err'])} |")
        brn, mabn_flags = cls["schedules"]["brn"], cls["schedules"]["mabn"]
        lines += ["", "¹ GN normalizes each image over channel groups: its result does not depend on the batch "
                      "(SGD batch 32 as every row).", "",
                  f"Schedules scaled to {budget['cls_iters']} iterations (same fraction of the run as published, "
                  f"see below): BRN `--brn_warmup {brn['brn_warmup']} --brn_r_ramp_end {brn['brn_r_ramp_end']} "
                  f"--brn_d_ramp_end {brn['brn_d_ramp_end']}` (r_max 3, d_max 5); MABN `--warmup_iters "
                  f"{mabn_flags['warmup_iters']} --mabn_r_warmup {mabn_flags['mabn_r_warmup']}` (moving-average "
                  f"batch 32).", ""]
        if cls.get("figure"):
            lines += [f"![classification]({cls['figure']})", ""]
        if budget["sweep"] and cls.get("sweep_figure"):
            lines += ["### Error vs normalization batch", "", "| Norm | " + " | ".join(
                f"b={b}" for b in (2, 4, 8, 16, 32)) + " |", "|---|" + "---|" * 5]
            for norm in ("bn", "brn", "mabn"):
                cells = {s["norm_batch"]: _mean_pm(s["top1_err"]) for s in cls["summary"] if s["norm"] == norm}
                lines.append(f"| {norm.upper()} | " + " | ".join(cells.get(b, "—") for b in (2, 4, 8, 16, 32)) + " |")
            lines += ["", f"![error vs normalization batch]({cls['sweep_figure']})", ""]

    return lines


def _speed_section(report: dict) -> List[str]:
    lines: List[str] = []
    speed = report["speed"]
    if speed and "rows" in speed:
        lines += ["## Inference speed (ResNet-50)", "",
                  f"Eval-mode forward of torchvision's ResNet-50 with each norm on this CPU ({speed['threads']} "
                  f"thread), batch {speed['batch']} at {speed['resolution']} px"
                  f"{' (small batch and resolution: quick mode)' if report['mode'] == 'quick' else ''}, median of "
                  f"{speed['rounds']} interleaved rounds (benchmarks' harness). it/s = forwards per second.", "",
                  "| Norm | it/s | images/s | ratio to BN | spread (IQR, %) | paper it/s (GPU) |",
                  "|---|---|---|---|---|---|"]
        for row in speed["rows"]:
            lines.append(f"| {row['variant']} | {row['it_per_s']:.2f} | {row['images_per_s']:.1f} | "
                         f"{row['ratio_to_bn']:.3f} | {row['iqr_pct']:.1f} | {_fmt(row['paper_it_per_s'])} |")
        lines += ["", "MABN folded: MABN + CenConv converted and folded into the convs with `mabn.fold_norms`. "
                      "The paper's column is the published GPU measurement, not comparable in absolute terms.", ""]

    return lines


def _statistics_section(report: dict) -> List[str]:
    budget = report["budget"]
    lines: List[str] = []
    stats = report["statistics"]
    if stats and "summary" in stats:
        lines += ["## Batch statistics (BN, batch 2 vs 32)", "",
                  f"`{stats['layer']}` of ResNet-20 with plain BN, channel 0, every iteration of "
                  f"{budget['stat_iters']} (`cls.train --record_statistics`, plotted with `cls.statistics_plot`).", "",
                  "| run | statistic | mean | std over iterations | min | max |", "|---|---|---|---|---|---|"]
        for label, per_stat in stats["summary"].items():
            for stat, values in per_stat.items():
                lines.append(f"| {label} | {stat} | {values['mean']:.4g} | {values['std']:.4g} | "
                             f"{values['min']:.4g} | {values['max']:.4g} |")
        lines += ["", f"![batch statistics]({stats['figure']})", ""]

    return lines


def _detection_section(report: dict) -> List[str]:
    lines: List[str] = []
    det = report["detection"]
    if det:
        lines += ["## Detection (embedded COCO-format shapes, tiny Mask R-CNN)", "",
                  "R-18-FPN tiny configs (`configs/det/shapes/`), 2 images per process (SyncBN: 2 processes), "
                  "evaluated with `det/tools/test_net.py` on the validation images. AP in %.", "",
                  "| Norm | processes | iterations | train + test seconds | AP^b | AP^b_50 | AP^b_75 | AP^m | AP^m_50 "
                  "| AP^m_75 |", "|---|---|---|---|---|---|---|---|---|---|"]
        schedules = []
        for row in det["rows"]:
            m = row["metrics"]
            cells = ["—"] * 6 if m is None else [_fmt(m[t][k]) for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")]
            name = DISPLAY_NAMES.get(row["norm"], row["norm"])
            seconds = "—" if row["seconds"] is None else f"{row['seconds']:.0f}"
            lines.append(f"| {name} | {row['processes']} | {row['iterations']} | {seconds} | " + " | ".join(cells) + " |")
            if row["schedule"]:
                prefix = f"MODEL.{row['norm'].upper()}"
                schedules.append(f"{name} `" + " ".join(f"{prefix}.{key} {value}" for key, value in row["schedule"].items())
                                 + "`")
        lines += ["", "Learning rate: the tiny configs' schedule (warm-up and steps), scaled to the same fractions "
                      "when the run is shortened with `--det_iters`. BRN's published schedule is scaled to the run; "
                      "MABN keeps the config's warm-ups (counted against its window of REAL_B / B iterations). "
                      + ("Norm schedules: " + "; ".join(schedules) + "." if schedules else ""), ""]
        drawing = det["drawing"]
        if drawing and "figure" in drawing:
            if sum(drawing["drawn_detections"]):
                lines.append(f"Predictions of the MABN model on validation images (the {MAX_DRAWN_NOTE} "
                             f"scoring >= {drawing['score_threshold']}):")
            else:
                lines.append(f"The MABN model made no detection scoring >= {min(DRAW_THRESHOLDS)} on these "
                             f"validation images, so they are shown without "
                             f"predictions:")
            lines += ["", f"![detections]({drawing['figure']})", ""]

    return lines


def _schedules_and_runs_section(report: dict) -> List[str]:
    """The published schedules with their fractions, and every run's exit status."""
    lines: List[str] = []
    lines += ["## Published schedules and their fractions", "", "| method | source | run length | iterations | fraction |",
              "|---|---|---|---|---|"]
    for item in report["published_schedules"]:
        for name, value in item["iterations"].items():
            lines.append(f"| {item['method']} {name} | {item['source']} | {item['run_length']} | {value} | "
                         f"{item['fractions'][name]:.5f} |")
    lines += ["", "Each count is scaled to round(fraction x miniature iterations), at least 1. r_max and d_max "
                  "keep their published values.", "", "## Runs", "", "| run | exit status | seconds | log |",
              "|---|---|---|---|"]
    for name, task in report["tasks"].items():
        lines.append(f"| {name} | {task['returncode']} | {task['seconds']:.0f} | {task['log']} |")
    lines += ["", "Every number is in `results.json`."]
    return lines


def _finite(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_outputs(out: str, report: dict) -> None:
    write_text_atomic(os.path.join(out, "results.json"), json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    write_text_atomic(os.path.join(out, "results.md"), _markdown(report))
