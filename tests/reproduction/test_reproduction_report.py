"""``reproduction.report`` on made-up run outputs: the --full tables, the sweep figure, the COCO
table, the claims, and what a missing result turns into (a listed failure, not a crash)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from det.config import load_config
from reproduction.classification import TABLE_ROWS, sweep_rows
from reproduction.cli import FULL, Plan
from reproduction.detection import config_file
from reproduction.report import collect, write_outputs
from reproduction.runner import TaskResult

TOP1 = {"BN@32": 30.0, "BN@2": 50.0, "BRN@2": 40.0, "GN@2": 35.0, "MABN@2": 31.0}


def _fake_cls_run(folder, top1: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps([{"epoch": 10, "loss": 1.5, "top1_err": top1,
                                                      "top5_err": top1 / 4}]))


def test_full_report_from_made_up_runs(tmp_path):
    out = tmp_path / "results"
    budget = dataclasses.replace(FULL, seeds=(0, 1), det_norms=("mabn", "syncbn"))
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
    speed_json.write_text(json.dumps({"threads": 1, "batch": 8, "resolution": 224, "rounds": 20, "rows": [
        {"variant": name, "median_ms": 10.0, "iqr_pct": 1.0, "it_per_s": rate, "images_per_s": 8 * rate,
         "ratio_to_bn": rate / 100.0, "paper_it_per_s": None}
        for name, rate in (("BN", 100.0), ("MABN folded", 99.0), ("IN", 60.0), ("GN", 55.0), ("LN", 70.0),
                           ("no norm", 101.0))]}))
    mabn_det = out / "runs" / "det" / "mabn"
    (mabn_det / "inference" / "shapes_val").mkdir(parents=True)
    (mabn_det / "inference" / "shapes_val" / "coco_results.json").write_text(json.dumps(
        {t: {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": -1.0} for t in ("bbox", "segm")}))
    det_runs = [{"norm": "mabn", "folder": str(mabn_det), "processes": 1, "iterations": 2700},
                {"norm": "syncbn", "folder": str(out / "runs" / "det" / "syncbn"), "processes": 2, "iterations": 2700}]
    plan = Plan([], cls_runs, [], det_runs, str(speed_json), ["a note"])
    args = argparse.Namespace(out=str(out), jobs=2, val_per_class=None, argv=["--full"])

    report = collect(plan, results, budget, args, "start", 123.0)
    write_outputs(str(out), report)

    stored = json.loads((out / "results.json").read_text())
    assert stored["claims_margin"] == 2.0 and [c["verdict"] for c in stored["claims"]] == ["reproduced"] * 4
    summary = {item["key"]: item for item in stored["classification"]["summary"]}
    assert summary["BN@2"]["top1_err"] == {"mean": 50.5, "std": 0.5 ** 0.5, "n": 2}
    assert summary["MABN@8"]["top1"] == [41.0, 42.0] and not summary["MABN@8"]["in_table"]
    failures = stored["failures"]
    assert any(f.startswith("det syncbn: no COCO results") for f in failures)
    assert any(f.startswith("drawing the predictions: no checkpoint") for f in failures)
    markdown = (out / "results.md").read_text()
    assert "| 2 | BN | 50.50 ± 0.71 | 12.62 ± 0.18 | 35.22 |" in markdown
    assert "| BRN | 40.50 ± 0.71 | 43.50 ± 0.71 | 41.50 ± 0.71 | 37.50 ± 0.71 | 29.50 ± 0.71 |" in markdown
    assert "| MABN | 1 | 2700 | — | 25.00 | 50.00 | 20.00 | 25.00 | 50.00 | 20.00 |" in markdown
    assert "| SyncBN | 2 | 2700 | — | — | — | — | — | — | — |" in markdown
    warmup = load_config(str(config_file("mabn"))).MODEL.MABN.WARMUP_ITERS
    assert f"MABN `MODEL.MABN.WARMUP_ITERS {warmup} MODEL.MABN.R_WARMUP_ITERS {max(1000, warmup)}`" in markdown
    assert "| MABN folded | 99.00 | 792.0 | 0.990 |" in markdown and "> note: a note" in markdown
    for figure in ("classification.png", "error_vs_norm_batch.png"):
        assert (out / "figures" / figure).read_bytes()[:4] == b"\x89PNG"
