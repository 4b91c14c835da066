"""Helpers for the ``cls`` trainer tests: tiny settings and subprocess launchers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence


REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "cls" / "train.py"

# A small embedded dataset: 10 classes x (8 train + 3 val) images.
TINY_DATA = ["--synthetic_classes", "10", "--synthetic_train_per_class", "8", "--synthetic_val_per_class", "3"]
# A tiny CPU run (callers add --norm etc. where the test needs something else).
TINY = ["--arch", "resnet20", "--image_size", "32", "--workers", "0", "--no-progress"] + TINY_DATA


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def run_python(args: Sequence[str], cwd: Path = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(nproc: int, script_args: Sequence[str], cwd: Path = REPO, timeout: float = 240,
             launcher: str = "torch.distributed.run", script: str = str(TRAIN_SCRIPT)) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N --master_port=FREE SCRIPT ARGS``."""
    command: List[str] = ["-m", launcher, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script,
                          *script_args]
    return run_python(command, cwd=cwd, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
