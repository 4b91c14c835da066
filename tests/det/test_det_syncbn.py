"""The SyncBN detector trains on CPU over 2 gloo processes with batch statistics shared across
ranks (each rank sees different images, so per-rank BN statistics would differ)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_two_gloo_processes_share_syncbn_statistics():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(HERE / "det_syncbn_worker.py"), "syncbn"], capture_output=True,
                            text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "same"
