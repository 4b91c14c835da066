import subprocess
import sys

import pytest
import torch

from benchmarks import before_after


def _in_git_checkout() -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True).returncode == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _in_git_checkout(), reason="needs a git checkout (git archive of a commit)")


def test_revision_loads_beside_the_working_tree_and_both_count_ops(tmp_path):
    import mabn

    before = before_after.load_revision("HEAD", str(tmp_path))
    assert before is not mabn and before.MABN2d is not mabn.MABN2d
    assert sys.modules["mabn"] is mabn and before.__file__.startswith(str(tmp_path))
    rows = before_after.bench_ops({"before": before, "after": mabn})
    assert [row["variant"] for row in rows] == list(before_after.LAYERS)
    for row in rows:   # the same commit's package on both sides: the same operators
        assert row["before"] == row["after"] and row["after"]["ops"] > row["after"]["views"] >= 0


def test_unknown_revision_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="--before no-such-commit: git archive failed"):
        before_after.load_revision("no-such-commit", str(tmp_path))


def test_markdown_reports_ratios_of_one_pass_and_the_repeat_change():
    medians = {"BN": 1.0, "GN": 2.0, "MABN before": 3.0, "MABN after": 1.5}
    layer = {"shape": [2, 64, 7, 7], "median_ms": medians,
             "ratio_to_bn": {k: v / 1.0 for k, v in medians.items()},
             "ratio_to_gn": {k: v / 2.0 for k, v in medians.items()}}
    train = {"arch": "resnet50", "resolution": 112, "batch": 2, "median_ms": {"BN": 10.0, "MABN+CenConv after": 12.0},
             "ratio_to_bn": {"BN": 1.0, "MABN+CenConv after": 1.2}}
    machine = {"torch": torch.__version__, "threads": 1, "cpu_model": "cpu", "cpu_count": 2, "load_average": [0.1],
               "time": "now"}
    results = {"machine": machine, "before": "abc", "after": "def", "passes": [{"layers": [layer], "train": train}],
               "ops": [{"variant": "MABN", "shape": [2, 64, 7, 7], "before": {"ops": 40, "views": 6},
                        "after": {"ops": 30, "views": 8}}],
               "largest_repeat_change": 0.031, "elapsed_s": 5.0}
    text = before_after.format_markdown(results)
    assert "| MABN | 2x64x7x7 | 40 (6 views) | 30 (8 views) |" in text
    assert "| 2x64x7x7 | MABN | 3.00x | 1.50x | 0.75x | 0.50x |" in text
    assert "| MABN+CenConv after | 12.0 | 1.20x |" in text
    assert "between the 1 passes: 3.1%" in text
