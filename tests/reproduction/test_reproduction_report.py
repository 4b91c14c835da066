"""``reproduction.report`` on made-up run outputs: the --full tables, the figures, the COCO tables,
the claims, what a missing result turns into (a listed failure, not a crash), and the README
block made from ``results.json``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reproduction.classification import TABLE_ROWS, sweep_rows
from reproduction.cli import FULL, Plan
from reproduction.detection import norm_schedule
from reproduction.readme import BEGIN, END, readme_block, replace_block
from reproduction.report import collect, write_outputs
from reproduction.runner import TaskResult

REPO = Path(__file__).resolve().parents[2]

TOP1 = {"BN@32": 30.0, "BN@2": 50.0, "BRN@2": 40.0, "GN@2": 35.0, "MABN@2": 31.0}


def _fake_cls_run(folder, top1: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps([{"epoch": 10, "loss": 1.5, "top1_err": top1,
                                                      "top5_err": top1 / 4}]))


def _fake_speed(path) -> None:
    """Every variant at ``rate`` it/s, folded MABN within the rounds' spread of folded BN."""
    rows = []
    for name, rate in (("BN", 95.0), ("BN folded", 100.0), ("MABN folded", 99.0), ("IN", 60.0), ("GN", 55.0),
                       ("LN", 70.0), ("no norm", 101.0)):
        factors = (1.01, 0.98, 1.02, 0.99, 1.0) if name == "MABN folded" else (1.0, 1.02, 0.98, 1.01, 0.99)
        times = [1e3 / rate * factor for factor in factors]
        rows.append({"variant": name, "median_ms": 1e3 / rate, "iqr_pct": 1.0, "it_per_s": rate,
                     "images_per_s": 8 * rate, "ratio_to_bn_folded": rate / 100.0, "paper_it_per_s": None,
                     "times_ms": times})
    path.write_text(json.dumps({"threads": 1, "batch": 8, "resolution": 224, "rounds": 5, "rows": rows}))


def _fake_det_run(folder, box_ap: float) -> None:
    (folder / "inference" / "shapes_val").mkdir(parents=True)
    (folder / "inference" / "shapes_val" / "coco_results.json").write_text(json.dumps(
        {t: {"AP": box_ap, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": -1.0} for t in ("bbox", "segm")}))


def _made_up_run(out):
    """A --full run's plan, results and outputs, with two classification seeds and two detection seeds."""
    budget = dataclasses.replace(FULL, seeds=(0, 1), det_norms=("bn", "mabn", "syncbn"), det_seeds=(0, 1))
    rows = list(TABLE_ROWS) + [r for r in sweep_rows() if r not in TABLE_ROWS]
    cls_runs, results = [], {}
    for row in rows:
        for seed in budget.seeds:
            folder = out / "runs" / "cls" / f"{row.key}_{seed}"
            _fake_cls_run(folder, (TOP1[row.key] if row.key in TOP1 else 45.0 - row.norm_batch / 2) + seed)
            cls_runs.append({"key": row.key, "norm": row.norm, "norm_batch": row.norm_batch, "seed": seed,
                             "folder": str(folder), "in_table": row in TABLE_ROWS})
            results[f"cls {row.key} seed {seed}"] = TaskResult(f"cls {row.key} seed {seed}", 0, 10.0, str(out / "l"))
    speed_json = out / "runs" / "speed.json"
    _fake_speed(speed_json)
    det_runs = []
    for norm in budget.det_norms:
        for seed in budget.det_seeds:
            folder = out / "runs" / "det" / f"{norm}_seed{seed}"
            if norm != "syncbn":
                _fake_det_run(folder, {"bn": 0.20, "mabn": 0.30}[norm] + 0.01 * seed)
            det_runs.append({"norm": norm, "seed": seed, "folder": str(folder), "processes": 2 if norm == "syncbn" else 1,
                             "iterations": 2700})
    plan = Plan([], cls_runs, [], det_runs, str(speed_json), ["a note"])
    args = argparse.Namespace(out=str(out), jobs=2, val_per_class=None, argv=["--full"])
    return plan, results, budget, args


def test_full_report_from_made_up_runs(tmp_path):
    out = tmp_path / "results"
    report = collect(*_made_up_run(out), "2026-12-05T10:00:00+0000", 123.0)
    write_outputs(str(out), report)

    stored = json.loads((out / "results.json").read_text())
    assert stored["date"] == "2026-12-05" and len(stored["versions"]["git_commit"]) == 40
    assert isinstance(stored["versions"]["git_dirty"], bool) and "2 standard errors" in stored["rule"]
    assert [c["verdict"] for c in stored["claims"]] == [
        "reproduced", "reproduced",
        "inconclusive (the difference does not count, but the seeds' spread allows one of up to 2.4 points)",
        "reproduced", "reproduced"]
    summary = {item["key"]: item for item in stored["classification"]["summary"]}
    assert summary["BN@2"]["top1_err"] == {"mean": 50.5, "std": 0.5 ** 0.5, "n": 2}
    assert summary["MABN@8"]["top1"] == [41.0, 42.0] and not summary["MABN@8"]["in_table"]
    assert len(stored["classification"]["runs"]) == 2 * (5 + 11)
    det = {item["norm"]: item for item in stored["detection"]["summary"]}
    assert det["mabn"]["bbox_AP"] == pytest.approx([30.0, 31.0]) and det["syncbn"]["bbox_AP"] == []
    failures = stored["failures"]
    assert sum(f.startswith("det syncbn seed") and "no COCO results" in f for f in failures) == 2
    assert any(f.startswith("drawing the predictions: no checkpoint") for f in failures)
    markdown = (out / "results.md").read_text()
    assert "| 2 | BN | 50.50 ± 0.71 | 12.62 ± 0.18 | 50.00, 51.00 | 35.22 |" in markdown
    assert "| BRN | 40.50 ± 0.71 | 43.50 ± 0.71 | 41.50 ± 0.71 | 37.50 ± 0.71 | 29.50 ± 0.71 |" in markdown
    assert "| MABN | 0, 1 | 30.50 ± 0.71 | 30.50 ± 0.71 | 30.00, 31.00 |" in markdown
    assert "| MABN | 1 | 1 | 2700 | — | 31.00 | 50.00 | 20.00 | 31.00 | 50.00 | 20.00 |" in markdown
    assert "| SyncBN | 0 | 2 | 2700 | — | — | — | — | — | — | — |" in markdown
    schedule = norm_schedule("mabn", 2700)
    assert (f"MABN `MODEL.MABN.WARMUP_ITERS {schedule['WARMUP_ITERS']} MODEL.MABN.R_WARMUP_ITERS "
            f"{schedule['R_WARMUP_ITERS']}`") in markdown
    assert "| MABN folded | 99.00 | 792.0 | 0.990 |" in markdown and "> note: a note" in markdown
    assert "Rule: a difference of two means over seeds counts when it exceeds both 2 standard errors" in markdown
    for figure in ("classification.png", "error_vs_norm_batch.png", "detection_ap.png"):
        assert (out / "figures" / figure).read_bytes()[:4] == b"\x89PNG"


def test_readme_block_quotes_the_run_and_is_rewritten_in_place(tmp_path):
    out = tmp_path / "results"
    report = collect(*_made_up_run(out), "2026-12-05T10:00:00+0000", 123.0)
    write_outputs(str(out), report)
    stored = json.loads((out / "results.json").read_text())
    block = readme_block(stored)
    assert block.startswith(BEGIN) and block.rstrip().endswith(END)
    assert f"at commit {stored['versions']['git_commit'][:12]}" in block and "on 2026-12-05: 2.0 min wall time" in block
    assert "| 2 | BN | 50.50 ± 0.71 | 12.62 ± 0.18 | 35.22 |" in block and "| MABN | 30.50 ± 0.71 |" in block
    assert "- **MABN@2 matches BN@32:** inconclusive (the difference does not count" in block
    assert "MABN folded 0.99x" in block and "2 standard errors" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{BEGIN}\nNumbers pending a run.\n{END}\nafter\n")
    command = [sys.executable, "-m", "reproduction.report", "--markdown", str(out / "results.json"), "--readme",
               str(readme)]
    for _ in range(2):  # idempotent
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert readme.read_text() == f"# x\n\nbefore\n{block}after\n"
    printed = subprocess.run(command[:-2], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert printed.stdout == block


def test_readme_without_markers_is_refused_with_one_line(tmp_path):
    from mabn.utils.errors import UserError

    readme = tmp_path / "README.md"
    readme.write_text(f"{END}\n{BEGIN}\n")
    with pytest.raises(UserError, match="expected one <!-- results:begin --> line followed by one"):
        replace_block(str(readme), "block")
    assert readme.read_text() == f"{END}\n{BEGIN}\n"


def test_the_readme_has_one_results_block():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
