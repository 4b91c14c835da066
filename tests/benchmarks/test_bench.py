"""End to end: the CLI runs every section on tiny sizes and writes well-formed JSON.

No assertion looks at a timing value; only structure and correctness checks (fold accuracy).
"""
import json
import os
import subprocess
import sys

from benchmarks import bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=280)


def test_tiny_run_writes_well_formed_json(tmp_path):
    path = tmp_path / "bench.json"
    done = _run("--tiny", "--threads", "1", "--json", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(path.read_text())
    assert {"machine", "config", "notes", "ops", "layers", "train", "infer", "compiled_mabn_kernels",
            "targets", "elapsed_s"} <= set(results)
    assert results["config"]["name"] == "tiny" and results["machine"]["threads"] == 1

    assert [row["variant"] for row in results["ops"]] == list(bench.OP_COUNT_VARIANTS)
    assert all(row["ops"] == sum(row["by_op"].values()) > 0 for row in results["ops"])
    for row in results["layers"]:
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["ratio_to_bn"] > 0 and row["ratio_to_gn"] > 0 and row["copies"] > 0
    layer_variants = {(tuple(row["shape"]), row["variant"]) for row in results["layers"]}
    assert ((4, 8, 6, 6), bench.GHOST) in layer_variants and ((4, 8, 6, 6), bench.SPLIT) in layer_variants
    assert ((2, 8, 4, 4), bench.SPLIT) not in layer_variants   # one group of B=2: nothing to split
    assert [row["variant"] for row in results["train"]] == list(bench.TRAIN_VARIANTS)
    assert all(row["finite"] and row["saved_mib"] > 0 for row in results["train"])
    folded = next(row for row in results["infer"] if row["variant"] == bench.MABN_FOLDED)
    assert folded["max_rel_diff_to_unfolded"] < 1e-3

    targets = results["targets"]
    assert targets and all(isinstance(t["passed"], bool) and t["kind"] in ("target", "goal") for t in targets)
    assert all(t["measured"] is not None for t in targets), [t["name"] for t in targets if t["measured"] is None]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS  ", "MISS  "))]
    assert len(verdicts) == len(targets)


def test_bad_argument_fails_fast_with_exit_2():
    done = _run("--rounds", "0")
    assert done.returncode == 2 and "--rounds must be >= 1" in done.stderr


def test_targets_cover_every_configured_shape_and_batch():
    names = [t.name for t in bench.evaluate_targets({}, bench.FULL)]
    for shape in bench.FULL.small_shapes + bench.FULL.full_shapes + bench.FULL.baseline_shapes:
        assert any(bench._shape_str(shape) in name for name in names)
    assert sum("train step b8" in name for name in names) == 1
    assert sum("train step b2" in name for name in names) == 2   # the target and the goal
