"""The README's results block, made from a run's ``results.json`` so that every number it quotes
comes from that run, with the run's commit and date.

The block sits between :data:`BEGIN` and :data:`END` in the README; :func:`replace_block`
rewrites what is between them and nothing else.
"""
from __future__ import annotations

import os
from typing import List

from mabn.utils.errors import UserError
from reproduction.markdown import DISPLAY_NAMES, classification_table, commit_text, fmt, mean_pm

__all__ = ["BEGIN", "END", "COMMAND", "readme_block", "replace_block"]

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
COMMAND = "python -m reproduction.report --markdown results/results.json --readme README.md"


def _run_line(report: dict) -> str:
    machine = report["machine"]
    command = " ".join(["python -m reproduction", *(report.get("command_line") or [])])
    return (f"Measured by `{command}` ({report['mode']} budget) at commit {commit_text(report['versions'])} on "
            f"{report['date']}: {report['wall_time_s'] / 60:.1f} min wall time on {machine.get('cpu_count')} CPUs "
            f"({machine.get('cpu_model')}), {report['jobs']} runs at once, torch {report['versions']['torch']}.")


def _classification_lines(report: dict) -> List[str]:
    cls = report.get("classification")
    if not cls:
        return []
    budget, setup = report["budget"], cls["setup"]
    lines = [f"Classification: {setup['network']} at {setup['image_size']} px on the embedded 16-class data, SGD "
             f"batch {setup['sgd_batch']}, {budget['cls_iters']} iterations, seeds {', '.join(map(str, budget['seeds']))}; top-1/top-5 error in % on "
             f"{report['cls_val_images']} validation images, mean ± sd over seeds.", ""]
    return lines + classification_table(cls["summary"], per_seed=False) + [""]


def _detection_lines(report: dict) -> List[str]:
    det = report.get("detection")
    if not det:
        return []
    lines = [f"Detection: tiny Mask R-CNN on the embedded shapes, 2 images per process, trained from scratch, seeds "
             f"{', '.join(map(str, report['budget']['det_seeds']))}; AP in %.", "",
             "| Norm | box AP | mask AP |", "|---|---|---|"]
    lines += [f"| {DISPLAY_NAMES.get(item['norm'], item['norm'])} | {mean_pm(item['bbox_AP_stats'])} | "
              f"{mean_pm(item['segm_AP_stats'])} |" for item in det["summary"]]
    return lines + [""]


def _speed_and_statistics_lines(report: dict) -> List[str]:
    lines = []
    speed = report.get("speed")
    if speed and "comparison" in speed:
        rows = {row["variant"]: row["ratio_to_bn_folded"] for row in speed["rows"]}
        lines.append(f"Inference (ResNet-50, 1 thread, batch {speed['batch']} at {speed['resolution']} px, measured "
                     f"alone): speed relative to folded BN: " + ", ".join(f"{name} {ratio:.2f}x"
                                                                        for name, ratio in rows.items()) + ".")
    stats = report.get("statistics")
    if stats and stats.get("fluctuation_ratio"):
        lines.append("Batch statistics of BN (`" + stats["layer"] + "`): fluctuation over iterations (sd / mean |value|) "
                     "at batch 2 relative to batch 32: " + ", ".join(
                         f"{stat} {fmt(ratio, 1)}x" for stat, ratio in stats["fluctuation_ratio"].items()) + ".")
    return lines + [""] if lines else []


def readme_block(report: dict) -> str:
    """The results block (markers included) for the report of one run."""
    lines = [BEGIN, f"<!-- written by `{COMMAND}`; edits between the markers are overwritten -->", "",
             _run_line(report), ""]
    lines += _classification_lines(report) + _detection_lines(report) + _speed_and_statistics_lines(report)
    lines += [f"Verdicts on the paper's claims ({report['rule']}; {report['speed_rule']}):", ""]
    lines += [f"- **{claim['claim']}:** {claim['verdict']}. {claim['evidence']}." for claim in report["claims"]]
    if report.get("failures"):
        lines += ["", f"Parts of this run failed ({len(report['failures'])}); see its results.md."]
    return "\n".join(lines + ["", END]) + "\n"


def replace_block(path: str, block: str) -> None:
    """Put ``block`` between the markers of the README at ``path`` (each must appear exactly once, in order)."""
    from mabn.utils.checkpoint import write_text_atomic

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UserError(f"--readme {path}: {exc.strerror or exc}") from None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise UserError(f"--readme {path}: expected one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text_atomic(os.path.abspath(path), head + block.rstrip("\n") + tail)
