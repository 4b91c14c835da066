"""End to end: ``python -m reproduction`` with a budget of seconds writes a well-formed results folder,
refuses to overwrite it, and reproduces its classification numbers exactly with the same seed.

Runs in subprocesses (the entry point starts its own subprocesses). The embedded classification
data are shrunk (4 training and 2 validation images per class) and cached under the test's
temporary folder; detection is skipped (its tiny Mask R-CNN evaluation alone takes a minute).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE_HEADER = "| Norm batch | Norm | Top-1 err | Top-5 err |"
ROW_KEYS = ["BN@32", "BN@2", "BRN@2", "GN@2", "MABN@2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reproduce(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "reproduction", "--out", str(out), "--iters", "10", "--seeds", "0",
               "--stat_iters", "2", "--train_per_class", "4", "--val_per_class", "2", "--data_cache", str(cache),
               "--speed_batch", "1", "--speed_resolution", "64", "--speed_rounds", "4", "--no-progress", *extra]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert height > 50 and width > 50, path


def _table_rows(markdown: str):
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.timeout(1500)
def test_tiny_budget_writes_tables_json_and_figures_and_reruns_exactly(tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    first = _reproduce(out, cache, "--skip", "detection")
    assert first.returncode == 0, first.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    assert report["mode"] == "quick" and report["budget"]["cls_iters"] == 10 and report["failures"] == []
    assert report["wall_time_s"] > 0 and report["versions"]["torch"] and report["machine"]["cpu_count"]
    assert len(report["versions"]["git_commit"]) == 40 and isinstance(report["versions"]["git_dirty"], bool)
    assert report["date"] == report["started"][:10]
    summary = {item["key"]: item for item in report["classification"]["summary"]}
    assert list(summary) == ROW_KEYS
    for item in summary.values():
        for metric in ("top1_err", "top5_err"):
            assert 0.0 <= item[metric]["mean"] <= 100.0 and item[metric]["n"] == 1
    assert report["classification"]["schedules"] == {"brn": {"brn_warmup": 1, "brn_r_ramp_end": 2, "brn_d_ramp_end": 2},
                                                     "mabn": {"warmup_iters": 1, "mabn_r_warmup": 1}}
    speed = {row["variant"]: row for row in report["speed"]["rows"]}
    assert list(speed) == ["BN", "BN folded", "MABN folded", "IN", "GN", "LN", "no norm"]
    assert all(row["it_per_s"] > 0 and math.isfinite(row["ratio_to_bn_folded"]) for row in speed.values())
    assert speed["BN folded"]["ratio_to_bn_folded"] == 1.0 and speed["IN"]["paper_it_per_s"] == 105.60
    assert all(len(row["times_ms"]) == 4 for row in speed.values())
    verdicts = [c["verdict"] for c in report["claims"]]
    assert verdicts[:3] == ["one seed: not judged"] * 3 and verdicts[3] in ("reproduced", "not reproduced")
    assert len(verdicts) == 4  # no detection claim: detection did not run
    assert report["statistics"]["layer"] and set(report["statistics"]["summary"]) == {"batch 2", "batch 32"}
    assert set(report["statistics"]["fluctuation_ratio"]) == {"mu_B", "sigma2_B", "g_B", "Psi_B"}
    assert report["detection"] is None

    markdown = (out / "results.md").read_text()
    rows = _table_rows(markdown)
    assert [(row[0], row[1]) for row in rows] == [("32", "BN"), ("2", "BN"), ("2", "BRN"), ("—¹", "GN"), ("2", "MABN")]
    for row in rows:
        assert re.fullmatch(r"\d+\.\d\d", row[2]) and re.fullmatch(r"\d+\.\d\d", row[3])
    for needle in ("## Paper claims", "## Inference speed (ResNet-50)", "| MABN folded |", "| BN folded |", "wall time",
                   "torch " + report["versions"]["torch"], "--brn_warmup 1", "## Published schedules",
                   "Rule: a difference of two means", "Fluctuation at batch 2 / at batch 32: mu_B"):
        assert needle in markdown, needle
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):
        _check_png(out / name)
    _check_png(out / report["statistics"]["figure"])
    assert len(report["statistics"]["figures"]) == 8  # 4 statistics x (channel 0, mean |.|)

    refused = _reproduce(out, cache, "--skip", "detection")
    assert refused.returncode == 2 and "already exists; pass --overwrite" in refused.stderr
    assert (out / "results.json").read_text() == json.dumps(report, indent=1) + "\n"  # untouched

    again = _reproduce(out, cache, "--overwrite", "--skip", "detection", "speed", "statistics")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "results.json").read_text())
    numbers = lambda r: {(run["key"], run["seed"]): (run["loss"], run["top1_err"], run["top5_err"])  # noqa: E731
                         for run in r["classification"]["runs"]}
    assert numbers(rerun) == numbers(report)
    assert not (out / "runs" / "speed.json").exists()  # --overwrite started from an empty folder


def test_help_names_the_module_command():
    result = subprocess.run([sys.executable, "-m", "reproduction", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m reproduction ")


def test_bad_input_fails_at_once_with_one_line(tmp_path):
    result = _reproduce(tmp_path / "r", tmp_path / "cache", "--iters", "15")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --iters 15: use a positive multiple of 10 (the run has 10 epochs; the learning rate drops after "
        "epochs 7 and 9)"]
    assert not (tmp_path / "r").exists()
