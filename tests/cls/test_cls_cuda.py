"""The ``cls`` trainer on a CUDA device: a torchrun run (one process, NCCL) of 20 iterations with
``--amp`` (float16 autocast with loss scaling), a resume from its checkpoint, and ``--test_only``
of the CUDA-written checkpoint on the CPU, all on the embedded dataset.

Run with ``python -m pytest -m cuda`` on a GPU machine (skipped without CUDA, also under
``MABN_CUDA_TESTS_DEVICE=cpu``: the run needs NCCL and CUDA's float16 autocast).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest
import torch
from cls_helpers import TINY, TRAIN_SCRIPT, describe, run_python, torchrun

pytestmark = pytest.mark.cuda

# resnet20 at 32 pixels, 8 images per iteration in MABN groups of 2 with a window of 2 groups;
# the warm-ups end within the first epoch, so the moving averages and r run under float16.
RUN = [*TINY, "--batch_size", "8", "--norm", "mabn", "--norm_batch", "2", "--ma_batch", "4", "--warmup_iters", "2",
       "--mabn_r_warmup", "4", "--iters_per_epoch", "10", "--save_interval", "1", "--val_batch_size", "16"]
TIMEOUT = 180


def _test_numbers(stdout: str) -> List[float]:
    """(loss, top-1 err, top-5 err) of the last TEST line."""
    lines = [line for line in stdout.splitlines() if "TEST: loss" in line]
    assert lines, stdout[-4000:]
    return [float(value) for value in re.findall(r"= (\d+\.\d+)", lines[-1])]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_finite_model(checkpoint: dict) -> None:
    for key, value in checkpoint["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_amp_torchrun_resume_then_test_only_on_cpu(real_cuda_device: torch.device, tmp_path: Path) -> None:
    save = tmp_path / "run"
    device = ["--device", real_cuda_device.type]
    first = torchrun(1, [*RUN, *device, "--amp", "--total_epoch", "2", "--save", str(save)], timeout=TIMEOUT)
    assert first.returncode == 0, describe(first)
    assert "1 process(es) on cuda (nccl)" in first.stdout, describe(first)
    checkpoint = _load(save / "checkpoint.pth")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (2, 0)
    assert checkpoint["scaler"] and checkpoint["scaler"]["scale"] > 0, checkpoint["scaler"]
    _assert_finite_model(checkpoint)

    resumed = torchrun(1, [*RUN, *device, "--amp", "--total_epoch", "3", "--save", str(save), "--checkpoint_dir",
                           str(save / "checkpoint.pth")], timeout=TIMEOUT)
    assert resumed.returncode == 0, describe(resumed)
    assert "TRAIN Epoch 3" in resumed.stdout and "TRAIN Epoch 2" not in resumed.stdout, describe(resumed)
    checkpoint = _load(save / "checkpoint.pth")
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 30
    _assert_finite_model(checkpoint)

    tested = run_python([str(TRAIN_SCRIPT), *RUN, "--device", "cpu", "--test_only", "--checkpoint_dir",
                         str(save / "checkpoint.pth"), "--save", str(tmp_path / "test")], timeout=TIMEOUT)
    assert tested.returncode == 0, describe(tested)
    assert "1 process(es) on cpu" in tested.stdout, describe(tested)
    # Float32 on the CPU against the float16 evaluation on CUDA that ended the resumed run.
    cpu_loss, cuda_loss = _test_numbers(tested.stdout)[0], _test_numbers(resumed.stdout)[0]
    assert cpu_loss == pytest.approx(cuda_loss, rel=1e-2), (describe(tested), describe(resumed))
