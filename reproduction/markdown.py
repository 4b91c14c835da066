"""``results.md`` of a reproduction run, made from the report dict that ``results.json`` stores."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

__all__ = ["fmt", "mean_pm", "commit_text", "classification_table", "results_markdown"]

MAX_DRAWN_NOTE = "highest-scoring detections per image, up to 8,"
DISPLAY_NAMES = {"bn": "BN", "brn": "BRN", "gn": "GN", "mabn": "MABN", "syncbn": "SyncBN"}


def fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def mean_pm(stat: Mapping[str, Optional[float]]) -> str:
    """``mean ± sd`` (``mean`` alone with one value)."""
    return fmt(stat["mean"]) + (f" ± {stat['std']:.2f}" if stat.get("std") is not None else "")


def _values(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def classification_table(summary: Sequence[dict], per_seed: bool, gn_mark: str = "") -> List[str]:
    """The classification rows of the table (mean ± sd per row), with each seed's top-1 error when
    ``per_seed``; GN's normalization batch cell is "—" followed by ``gn_mark``."""
    seeds_header = " Top-1 err per seed |" if per_seed else ""
    lines = [f"| Norm batch | Norm | Top-1 err | Top-5 err |{seeds_header} paper Top-1 err (ResNet-50, ImageNet) |",
             "|---|---|---|---|" + ("---|" if per_seed else "") + "---|"]
    for item in (item for item in summary if item["in_table"]):
        batch = "—" + gn_mark if item["norm_batch"] is None else str(item["norm_batch"])
        seeds = f" {_values(item['top1'])} |" if per_seed else ""
        lines.append(f"| {batch} | {item['norm'].upper()} | {mean_pm(item['top1_err'])} | {mean_pm(item['top5_err'])} |"
                     f"{seeds} {fmt(item['paper_top1_err'])} |")
    return lines


def commit_text(versions: Mapping[str, object]) -> str:
    """``abc1234`` (``+ local changes`` when the tree was dirty) or ``unknown``."""
    commit = versions.get("git_commit")
    if not commit:
        return "unknown"
    return str(commit)[:12] + (" + local changes" if versions.get("git_dirty") else "")


def results_markdown(report: dict) -> str:
    """The run's header, the claims, then one section per part that ran."""
    sections = (_header_section, _claims_section, _classification_section, _speed_section, _statistics_section,
                _detection_section, _schedules_and_runs_section)
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _header_section(report: dict) -> List[str]:
    """Title, machine, versions, commit, timing, notes and failures."""
    machine, versions = report["machine"], report["versions"]
    lines: List[str] = [f"# MABN miniature reproduction ({report['mode']})", ""]
    start_load = report.get("load_at_start")
    load = (f", 1-min load {start_load:.1f} at the start and {machine['load_average'][0]:.1f} at the end"
            if start_load is not None and machine.get("load_average") else "")
    lines += [f"- machine: {machine.get('cpu_model')} ({machine.get('cpu_count')} CPUs{load}), {report['jobs']} runs "
              f"at once, 1 thread each",
              f"- versions: Python {versions['python']}, torch {versions['torch']}, torchvision "
              f"{versions['torchvision']}, numpy {versions['numpy']}",
              f"- commit {commit_text(versions)}",
              f"- started {report['started']}, finished {report['finished']}, wall time "
              f"{report['wall_time_s'] / 60:.1f} min", ""]
    lines += [line for note in report["notes"] for line in (f"> note: {note}", "")]
    if report["failures"]:
        lines += ["**Failures:**", ""] + [f"- {failure}" for failure in report["failures"]] + [""]
    return lines


def _claims_section(report: dict) -> List[str]:
    lines = ["## Paper claims", "", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in report["claims"]]
    lines += ["", f"Rule: {report['rule']}.", "", f"Inference speed: {report['speed_rule']}.", ""]
    return lines


def _classification_section(report: dict) -> List[str]:
    budget, cls = report["budget"], report["classification"]
    if not cls:
        return []
    setup = cls["setup"]
    epochs, milestones = setup["epochs"], setup["lr_milestones"]
    lines = [f"## Classification (embedded data, {setup['network']})", "",
             f"{setup['network']} at {setup['image_size']} px on the embedded 16-class dataset, SGD batch "
             f"{setup['sgd_batch']} in one process, {budget['cls_iters']} iterations ({epochs} epochs of "
             f"{budget['cls_iters'] // epochs}), learning rate {setup['learning_rate']} x0.1 after epochs "
             f"{' and '.join(map(str, milestones))}, seeds "
             f"{', '.join(map(str, budget['seeds']))}; the same for every row. Errors in % on the "
             f"{report['cls_val_images']} validation images, mean ± standard deviation over seeds.", ""]
    lines += classification_table(cls["summary"], per_seed=True, gn_mark="¹")
    brn, mabn_flags = cls["schedules"]["brn"], cls["schedules"]["mabn"]
    lines += ["", "¹ GN normalizes each image over channel groups: its result does not depend on the batch "
                  f"(SGD batch {setup['sgd_batch']} as every row).", "",
              f"Schedules scaled to {budget['cls_iters']} iterations (same fraction of the run as published, "
              f"see below): BRN `--brn_warmup {brn['brn_warmup']} --brn_r_ramp_end {brn['brn_r_ramp_end']} "
              f"--brn_d_ramp_end {brn['brn_d_ramp_end']}` (r_max 3, d_max 5); MABN `--warmup_iters "
              f"{mabn_flags['warmup_iters']} --mabn_r_warmup {mabn_flags['mabn_r_warmup']}` (moving-average "
              f"batch 32).", ""]
    if cls.get("figure"):
        lines += [f"![classification]({cls['figure']})", ""]
    if budget["sweep"] and cls.get("sweep_figure"):
        batches = (2, 4, 8, 16, 32)
        lines += ["### Error vs normalization batch", "", "| Norm | " + " | ".join(f"b={b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for norm in ("bn", "brn", "mabn"):
            cells = {s["norm_batch"]: mean_pm(s["top1_err"]) for s in cls["summary"] if s["norm"] == norm}
            lines.append(f"| {norm.upper()} | " + " | ".join(cells.get(b, "—") for b in batches) + " |")
        lines += ["", f"![error vs normalization batch]({cls['sweep_figure']})", ""]
    return lines


def _speed_section(report: dict) -> List[str]:
    speed = report["speed"]
    if not speed or "rows" not in speed:
        return []
    lines = ["## Inference speed (ResNet-50)", "",
             f"Eval-mode forward of torchvision's ResNet-50 with each norm on this CPU ({speed['threads']} thread, "
             f"nothing else running), batch {speed['batch']} at {speed['resolution']} px"
             f"{' (small batch and resolution: quick mode)' if report['mode'] == 'quick' else ''}, median of "
             f"{speed['rounds']} interleaved rounds (benchmarks' harness). it/s = forwards per second.", "",
             "| Norm | it/s | images/s | ratio to BN folded | spread (IQR, %) | paper it/s (GPU) |",
             "|---|---|---|---|---|---|"]
    for row in speed["rows"]:
        lines.append(f"| {row['variant']} | {row['it_per_s']:.2f} | {row['images_per_s']:.1f} | "
                     f"{row['ratio_to_bn_folded']:.3f} | {row['iqr_pct']:.1f} | {fmt(row['paper_it_per_s'])} |")
    comparison = speed["comparison"]
    spread = (f", quartiles {comparison['q1']:.3f}-{comparison['q3']:.3f}" if comparison["judged"] else "")
    lines += ["", f"Folded MABN / folded BN speed, round by round: median {comparison['median']:.3f}{spread} over "
                  f"{comparison['rounds']} rounds.", "",
              "BN: as trained (eval mode); BN folded and MABN folded: MABN + CenConv and BN folded into the convs with "
              "`mabn.fold_norms` (a plain conv with bias each). The paper's column is the published GPU measurement, "
              "not comparable in absolute terms.", ""]
    return lines


def _statistics_section(report: dict) -> List[str]:
    stats = report["statistics"]
    if not stats or "summary" not in stats:
        return []
    lines = ["## Batch statistics (BN, batch 2 vs 32)", "",
             f"`{stats['layer']}` of ResNet-20 with plain BN, channel 0, every iteration of "
             f"{report['budget']['stat_iters']} (`cls.train --record_statistics`, plotted with `cls.statistics_plot`). "
             f"Fluctuation: standard deviation over iterations / mean absolute value.", "",
             "| run | statistic | mean | std over iterations | min | max | fluctuation |", "|---|---|---|---|---|---|---|"]
    for label, per_stat in stats["summary"].items():
        for stat, values in per_stat.items():
            lines.append(f"| {label} | {stat} | {values['mean']:.4g} | {values['std']:.4g} | {values['min']:.4g} | "
                         f"{values['max']:.4g} | {fmt(values['fluctuation'], 3)} |")
    if stats.get("fluctuation_ratio"):
        lines += ["", "Fluctuation at batch 2 / at batch 32: " + ", ".join(
            f"{stat} {fmt(ratio, 1)}x" for stat, ratio in stats["fluctuation_ratio"].items()) + "."]
    lines += ["", f"![batch statistics]({stats['figure']})", ""]
    return lines


def _detection_section(report: dict) -> List[str]:
    det = report["detection"]
    if not det:
        return []
    lines = ["## Detection (embedded COCO-format shapes, tiny Mask R-CNN)", "",
             "Tiny configs (`configs/det/shapes/`), 2 images per process (SyncBN: 2 processes), trained from "
             "scratch for the same iterations and evaluated with `det/tools/test_net.py` on the validation images. AP in %, mean ± "
             "standard deviation over seeds.", "", "| Norm | seeds | AP^b | AP^m | AP^b per seed |", "|---|---|---|---|---|"]
    for item in det["summary"]:
        lines.append(f"| {DISPLAY_NAMES.get(item['norm'], item['norm'])} | {', '.join(map(str, item['seeds'])) or '—'} "
                     f"| {mean_pm(item['bbox_AP_stats'])} | {mean_pm(item['segm_AP_stats'])} | "
                     f"{_values(item['bbox_AP']) or '—'} |")
    lines += ["", "| Norm | seed | processes | iterations | train + test seconds | AP^b | AP^b_50 | AP^b_75 | AP^m | "
                  "AP^m_50 | AP^m_75 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    schedules = {}
    for row in det["rows"]:
        m = row["metrics"]
        cells = ["—"] * 6 if m is None else [fmt(m[t][k]) for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")]
        name = DISPLAY_NAMES.get(row["norm"], row["norm"])
        seconds = "—" if row["seconds"] is None else f"{row['seconds']:.0f}"
        lines.append(f"| {name} | {row['seed']} | {row['processes']} | {row['iterations']} | {seconds} | "
                     + " | ".join(cells) + " |")
        if row["schedule"]:
            prefix = f"MODEL.{row['norm'].upper()}"
            schedules[name] = f"{name} `" + " ".join(f"{prefix}.{k} {v}" for k, v in row["schedule"].items()) + "`"
    lines += ["", "Learning rate: the tiny configs' schedule (warm-up and steps), scaled to the same fractions "
                  "when the run is shortened with `--det_iters`. BRN's published schedule is scaled to the run; "
                  "MABN keeps the config's warm-ups (counted against its window of REAL_B / B iterations). "
                  + ("Norm schedules: " + "; ".join(schedules.values()) + "." if schedules else ""), ""]
    if det.get("figure"):
        lines += [f"![detection AP]({det['figure']})", ""]
    return lines + _drawing_lines(det["drawing"])


def _drawing_lines(drawing: Optional[dict]) -> List[str]:
    if not drawing or "figure" not in drawing:
        return []
    if sum(drawing["drawn_detections"]):
        lead = (f"Predictions of the MABN model (seed {drawing['seed']}) on validation images (the {MAX_DRAWN_NOTE} "
                f"scoring >= {drawing['score_threshold']}):")
    else:
        lead = (f"The MABN model (seed {drawing['seed']}) made no detection scoring >= {min(drawing['thresholds'])} "
                f"on these validation images, so they are shown without predictions:")
    return [lead, "", f"![detections]({drawing['figure']})", ""]


def _schedules_and_runs_section(report: dict) -> List[str]:
    """The published schedules with their fractions, and every run's exit status."""
    lines = ["## Published schedules and their fractions", "", "| method | source | run length | iterations | fraction |",
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
    lines += ["", "Every number, every seed's included, is in `results.json`."]
    return lines
