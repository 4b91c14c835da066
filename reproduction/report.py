"""Gather the numbers of a reproduction run and write ``results.json``, ``results.md`` and figures.

``python -m reproduction.report --markdown results/results.json [--readme README.md]`` prints the
README's results block made from a run's ``results.json`` (or rewrites that block of the README
in place, see :mod:`reproduction.readme`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from mabn.utils.checkpoint import write_text_atomic
from reproduction.figures import FIGURES
from reproduction.markdown import DISPLAY_NAMES

__all__ = ["collect", "write_outputs", "versions", "main"]

DRAW_THRESHOLDS = (0.5, 0.3, 0.1)


def _git(*arguments: str) -> str:
    from reproduction.detection import REPO_ROOT

    return subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=10).stdout.strip()


def versions() -> Dict[str, object]:
    """Python, torch, torchvision, numpy, the repository's commit (``git rev-parse HEAD``) and whether
    tracked files had local changes (``git_dirty``); None where git does not answer."""
    import numpy
    import torch
    import torchvision

    commit, dirty = None, None
    try:
        commit = _git("rev-parse", "HEAD") or None
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "git_commit": commit, "git_dirty": dirty}


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) >= 2 else None,
            "n": len(values)}


def _classification(plan, results, budget) -> dict:
    """Every run's numbers, and per row the values of each seed with their mean and sd."""
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
            failures.append(f"{name}: no result (exit status {entry['returncode']}, "
                            f"log {status.log_path if status else '-'})")
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
    return {"runs": runs, "summary": list(summary.values()), "schedules": schedules, "failures": failures,
            "setup": _classification_setup()}


def _classification_setup() -> Dict[str, object]:
    """What every classification run shares, as the results describe it."""
    from reproduction import classification

    return {"network": classification.ARCH.replace("resnet", "ResNet-"), "image_size": classification.IMAGE_SIZE,
            "sgd_batch": classification.SGD_BATCH, "epochs": classification.EPOCHS,
            "lr_milestones": list(classification.LR_MILESTONES), "learning_rate": classification.LEARNING_RATE}


def _speed(plan, results) -> Optional[dict]:
    """speed.json with the round-by-round comparison of folded MABN with folded BN."""
    from reproduction.claims import speed_comparison
    from reproduction.speed import BN_FOLDED

    if plan.speed_json is None:
        return None
    if not os.path.isfile(plan.speed_json):
        status = results.get("inference speed")
        return {"failure": f"inference speed: no result (log {status.log_path if status else '-'})"}
    with open(plan.speed_json, encoding="utf-8") as handle:
        speed = json.load(handle)
    times = {row["variant"]: row["times_ms"] for row in speed["rows"]}
    speed["comparison"] = speed_comparison(times[BN_FOLDED], times["MABN folded"])
    return speed


def _statistics(plan, results, out: str) -> Optional[dict]:
    """The statistics figures and per-statistic summary; each statistic's fluctuation ratio batch 2 / 32."""
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
        summary = summarize_runs(folders, labels, layer)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return {"failure": f"statistics: {exc}"}
    ratios = None
    if {"batch 2", "batch 32"} <= set(summary):
        ratios = {stat: _ratio(values["fluctuation"], summary["batch 32"][stat]["fluctuation"])
                  for stat, values in summary["batch 2"].items()}
    return {"layer": layer, "figure": os.path.relpath(figure, out),
            "figures": [os.path.relpath(p, out) for p in per_statistic], "summary": summary,
            "fluctuation_ratio": ratios}


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator and math.isfinite(denominator) else None


def _detection_rows(plan, results) -> List[dict]:
    from reproduction.detection import norm_schedule, read_coco_results

    rows = []
    for run in plan.det_runs:
        status = results.get(f"det {run['norm']} seed {run['seed']}")
        metrics = read_coco_results(run["folder"])
        row = {"norm": run["norm"], "seed": run["seed"], "processes": run["processes"], "iterations": run["iterations"],
               "schedule": norm_schedule(run["norm"], run["iterations"]),
               "returncode": None if status is None else status.returncode,
               "seconds": None if status is None else status.seconds, "metrics": metrics}
        if metrics is None:
            row["failure"] = (f"det {run['norm']} seed {run['seed']}: no COCO results "
                              f"(log {status.log_path if status else '-'})")
        rows.append(row)
    return rows


def _detection_drawing(plan, rows: List[dict], out: str) -> Optional[dict]:
    """Predictions of the first MABN run with a result, drawn on validation images."""
    from reproduction.detection import draw_predictions

    drawn = next((r for r in rows if r["norm"] == "mabn" and r["metrics"] is not None), None)
    if drawn is None:
        return None
    path = os.path.join(out, FIGURES, "detection_mabn_predictions.png")
    run = next(run for run in plan.det_runs if run["norm"] == "mabn" and run["seed"] == drawn["seed"])
    try:
        return dict(draw_predictions("mabn", run["iterations"], os.path.abspath(run["folder"]), path,
                                     thresholds=DRAW_THRESHOLDS), figure=os.path.relpath(path, out), seed=run["seed"],
                    thresholds=list(DRAW_THRESHOLDS))
    except (OSError, RuntimeError, ValueError) as exc:
        return {"failure": f"drawing the predictions: {exc}"}


def _detection(plan, results, out: str) -> Optional[dict]:
    """Per run the COCO metrics; per norm each seed's box and mask AP with mean and sd; the figures."""
    from reproduction.figures import detection_figure

    if not plan.det_runs:
        return None
    rows = _detection_rows(plan, results)
    summary = []
    for norm in dict.fromkeys(row["norm"] for row in rows):
        done = [row for row in rows if row["norm"] == norm and row["metrics"] is not None]
        item = {"norm": norm, "seeds": [row["seed"] for row in done]}
        for iou_type in ("bbox", "segm"):
            item[f"{iou_type}_AP"] = [row["metrics"][iou_type]["AP"] for row in done]
            item[f"{iou_type}_AP_stats"] = _mean_std(item[f"{iou_type}_AP"])
        summary.append(item)
    figure = detection_figure(summary, [DISPLAY_NAMES.get(i["norm"], i["norm"]) for i in summary], out)
    return {"rows": rows, "summary": summary, "figure": figure, "drawing": _detection_drawing(plan, rows, out)}


def _classification_figures(report: dict, out: str) -> None:
    from reproduction.figures import classification_figure, sweep_figure

    summary = report["classification"]["summary"] if report.get("classification") else []
    table = [item for item in summary if item["in_table"]]
    if table:
        report["classification"]["figure"] = classification_figure(
            table, report["classification"]["setup"]["network"], report["budget"]["cls_iters"], out)
    sweep = [item for item in summary if item["norm"] in ("bn", "brn", "mabn")]
    if report["budget"]["sweep"] and sweep:
        report["classification"]["sweep_figure"] = sweep_figure(sweep, report["classification"]["setup"]["network"], out)


def _failures(report: dict) -> List[str]:
    failures = list(report["classification"]["failures"]) if report["classification"] else []
    for part in ("speed", "statistics"):
        if report[part] and "failure" in report[part]:
            failures.append(report[part]["failure"])
    if report["detection"]:
        failures += [row["failure"] for row in report["detection"]["rows"] if "failure" in row]
        drawing = report["detection"]["drawing"]
        if drawing and "failure" in drawing:
            failures.append(drawing["failure"])
    return failures


def _claims(report: dict, budget) -> List[dict]:
    from reproduction.claims import check_claims

    top1 = {item["key"]: item["top1"] for item in report["classification"]["summary"] if item["in_table"]} \
        if report["classification"] else {}
    speed = report["speed"].get("comparison") if report["speed"] else None
    det = report["detection"]
    box_ap = {item["norm"]: item["bbox_AP"] for item in det["summary"]} if det else None
    return check_claims(top1, speed, box_ap, budget.det_seeds)


def collect(plan, results, budget, args, started_at: str, wall_time_s: float) -> dict:
    """Every number of the run as one JSON-ready dict (figures are drawn on the way)."""
    import dataclasses

    import torch

    from benchmarks.bench import machine_info
    from reproduction.claims import RULE, SPEED_RULE
    from reproduction.schedules import BRN_SCHEDULE, MABN_CLS_SCHEDULE, MABN_DET_SCHEDULE

    out = args.out
    os.makedirs(os.path.join(out, FIGURES), exist_ok=True)
    report: dict = {"mode": budget.name, "budget": dataclasses.asdict(budget), "command_line": getattr(args, "argv", None),
                    "started": started_at, "date": started_at[:10], "machine": machine_info(torch.device("cpu")),
                    "versions": versions(), "jobs": args.jobs, "threads_per_run": 1,
                    "load_at_start": getattr(args, "load_at_start", None), "notes": list(plan.notes),
                    "rule": RULE, "speed_rule": SPEED_RULE}
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
    report["failures"] = _failures(report)
    report["claims"] = _claims(report, budget)
    _classification_figures(report, out)
    report["wall_time_s"] = wall_time_s
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report


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
    from reproduction.markdown import results_markdown

    write_text_atomic(os.path.join(out, "results.json"), json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    write_text_atomic(os.path.join(out, "results.md"), results_markdown(report))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the README block of a run's results.json, or rewrite it in a README (0; 2: bad input)."""
    from mabn.utils.errors import UserError, run_cli
    from reproduction.readme import readme_block, replace_block

    parser = argparse.ArgumentParser(prog="python -m reproduction.report", description=main.__doc__)
    parser.add_argument("--markdown", required=True, metavar="RESULTS_JSON",
                        help="a run's results.json: print the README results block made from it")
    parser.add_argument("--readme", default=None, help="rewrite the results block of this README in place instead")
    args = parser.parse_args(argv)

    def work() -> int:
        try:
            with open(args.markdown, encoding="utf-8") as handle:
                report = json.load(handle)
        except (OSError, ValueError) as exc:
            raise UserError(f"--markdown {args.markdown}: {exc}") from None
        block = readme_block(report)
        if args.readme is None:
            sys.stdout.write(block)
        else:
            replace_block(args.readme, block)
            print(f"rewrote the results block of {args.readme}", file=sys.stderr)
        return 0

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
