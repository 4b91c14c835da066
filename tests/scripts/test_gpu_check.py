"""``scripts/gpu_check.sh``: valid shell, and on a machine without a CUDA device it stops at once
with one line and exit status 2, before installing or running anything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_before_any_work(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=SCRIPT.parents[1], timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["gpu_check: torch sees no CUDA device; run this on a GPU machine"]
    assert list((tmp_path / "out").iterdir()) == []
