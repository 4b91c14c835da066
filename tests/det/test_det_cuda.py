"""The detection tools on a CUDA device: ``tools/train_net.py`` with the tiny MABN config for 20
iterations in mixed precision (``DTYPE float16``: float16 autocast with loss scaling), writing
periodic checkpoints, then ``tools/test_net.py`` on the last one, on a tiny shapes dataset in the
COCO layout (8 + 4 images of 64 pixels).

Run with ``python -m pytest -m cuda`` on a GPU machine (skipped without CUDA, also under
``MABN_CUDA_TESTS_DEVICE=cpu``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest
import torch

from det_helpers import REPO, TINY_CONFIG, TOOL_OPTIONS

from det.data.shapes import ensure_shapes_dataset
from det.engine.checkpoint import read_checkpoint

pytestmark = pytest.mark.cuda

# MABN's warm-ups end early so that its moving averages and r run under float16 within the 20
# iterations.
SMALL = [*TOOL_OPTIONS, "MODEL.MABN.WARMUP_ITERS", "5", "MODEL.MABN.R_WARMUP_ITERS", "10"]
TIMEOUT = 240


@pytest.fixture()
def data_root(real_cuda_device: torch.device, tmp_path: Path) -> str:
    """A tiny shapes dataset in the published COCO layout (written only where CUDA is there)."""
    shapes = ensure_shapes_dataset(tmp_path / "shapes", seed=1, categories=3, train_images=8, val_images=4,
                                   image_size=64, log=lambda *_: None)
    root = tmp_path / "data"
    (root / "coco" / "annotations").mkdir(parents=True)
    for split, name in (("train", "train2017"), ("val", "val2017")):
        (root / "coco" / name).symlink_to(shapes.img_dir(split))
        (root / "coco" / "annotations" / f"instances_{name}.json").symlink_to(shapes.ann_file(split))
    return str(root)


def _tool(name: str, args: Sequence[str]) -> subprocess.CompletedProcess:
    """``python tools/NAME.py ARGS`` from ``det/``, in one process."""
    return subprocess.run([sys.executable, f"tools/{name}.py", *args], cwd=REPO / "det", capture_output=True,
                          text=True, timeout=TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"


def _opts(data_root: str, output_dir: Path, device: str, *extra: str) -> List[str]:
    return [*SMALL, "DATASETS.ROOT", data_root, "OUTPUT_DIR", str(output_dir), "MODEL.DEVICE", device,
            "DTYPE", "float16", *extra]


def test_float16_training_checkpoints_then_test_net(real_cuda_device: torch.device, data_root: str,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    trained = _tool("train_net", ["--skip-test", "--config-file", TINY_CONFIG,
                                  *_opts(data_root, out, real_cuda_device.type, "SOLVER.MAX_ITER", "20",
                                         "SOLVER.CHECKPOINT_PERIOD", "10")])
    assert trained.returncode == 0, _describe(trained)
    log = (out / "log.txt").read_text()
    assert "Using 1 process(es) on cuda" in log and "iter: 20  loss: " in log, log[-4000:]
    assert (out / "model_0000010.pth").is_file() and (out / "model_0000020.pth").is_file()
    checkpoint = read_checkpoint(str(out / "model_0000020.pth"))
    assert checkpoint["iteration"] == 20
    assert checkpoint["scaler"] and checkpoint["scaler"]["scale"] > 0, checkpoint["scaler"]
    for key, value in checkpoint["model"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key

    evaluation = tmp_path / "eval"
    tested = _tool("test_net", ["--config-file", TINY_CONFIG, "--ckpt", str(out / "model_0000020.pth"),
                                *_opts(data_root, evaluation, real_cuda_device.type)])
    assert tested.returncode == 0, _describe(tested)
    assert "Using 1 process(es) on cuda" in tested.stdout, _describe(tested)
    results = json.loads((evaluation / "inference" / "coco_2017_val" / "coco_results.json").read_text())
    assert set(results) == {"bbox", "segm"}, results
    for metrics in results.values():
        assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}, results
        assert all(math.isfinite(value) for value in metrics.values()), results
