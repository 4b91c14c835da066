"""tools/train_net.py and tools/test_net.py: a 2-process gloo run that checkpoints and resumes,
test_net on its checkpoint, SIGTERM, and (in-process, one process) SyncBN, NaN and bad inputs.

Everything runs on a tiny COCO-format dataset (the shapes generator at 64 pixels, 8 + 4 images)
laid out as ``coco_2017_train`` / ``coco_2017_val`` under a temporary DATASETS.ROOT.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from det_helpers import REPO, TINY_CONFIG, TOOL_OPTIONS

from det.data.shapes import ensure_shapes_dataset
from det.engine import launch
from det.engine.checkpoint import find_last_checkpoint, read_checkpoint
from mabn.utils.lock import FolderLock



@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    """A tiny shapes dataset in the published COCO layout."""
    shapes = ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, categories=3, train_images=8,
                                   val_images=4, image_size=64, log=lambda *_: None)
    root = tmp_path_factory.mktemp("data")
    (root / "coco" / "annotations").mkdir(parents=True)
    for split, name in (("train", "train2017"), ("val", "val2017")):
        (root / "coco" / name).symlink_to(shapes.img_dir(split))
        (root / "coco" / "annotations" / f"instances_{name}.json").symlink_to(shapes.ann_file(split))
    return str(root)


def _opts(data_root: str, output_dir, *extra: str):
    return TOOL_OPTIONS + ["DATASETS.ROOT", data_root, "OUTPUT_DIR", str(output_dir), *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _tool(name: str, args, nproc: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    # --standalone: a free port (the default 29500 may be taken by another run on this machine).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.run(launcher + [f"tools/{name}.py", *args], cwd=REPO / "det", capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _train_in_process(capsys, *args: str) -> tuple:
    status = launch.train_net_main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_two_gloo_processes_checkpoint_resume_and_test_net(data_root, tmp_path):
    out = tmp_path / "out"
    common = ["--config-file", TINY_CONFIG, *_opts(data_root, out, "SOLVER.IMS_PER_BATCH", "4",
                                                   "SOLVER.CHECKPOINT_PERIOD", "1")]
    first = _tool("train_net", ["--skip-test", *common, "SOLVER.MAX_ITER", "2"], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_0000001.pth").is_file() and (out / "model_0000002.pth").is_file()
    assert find_last_checkpoint(str(out)) == str(out / "model_final.pth")
    checkpoint = read_checkpoint(str(out / "model_final.pth"))
    assert checkpoint["iteration"] == 2 and checkpoint["world_size"] == 2 and len(checkpoint["rank_states"]) == 2
    log = (out / "log.txt").read_text()
    assert "iter: 2  loss: " in log and "loss_mask: " in log and "max mem: " in log
    assert (out / "config.yml").is_file()

    second = _tool("train_net", ["--skip-test", *common, "SOLVER.MAX_ITER", "3"], nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Resuming from" in log and "at iteration 2" in log
    assert "changed since the checkpoint: SOLVER.MAX_ITER 2 -> 3 (applied)" in log
    assert read_checkpoint(str(out / "model_final.pth"))["iteration"] == 3 and (out / "model_0000003.pth").is_file()

    test = _tool("test_net", ["--config-file", TINY_CONFIG, "--ckpt", str(out / "model_0000003.pth"),
                              *_opts(data_root, tmp_path / "eval")])
    assert test.returncode == 0, test.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "inference" / "coco_2017_val" / "coco_results.json").read_text())
    assert set(results) == {"bbox", "segm"} and set(results["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_root, tmp_path):
    out = tmp_path / "out"
    # One loader worker: its process must not keep the stopped run from exiting.
    process = subprocess.Popen([sys.executable, "tools/train_net.py", "--skip-test", "--config-file", TINY_CONFIG,
                                *_opts(data_root, out, "SOLVER.MAX_ITER", "200", "DATALOADER.NUM_WORKERS", "1")],
                               cwd=REPO / "det",
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        for line in process.stdout:
            if "Start training" in line:
                break
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    path = find_last_checkpoint(str(out))
    iteration = read_checkpoint(path)["iteration"]
    assert 1 <= iteration < 200 and path == str(out / f"model_{iteration:07d}.pth")
    assert "SIGTERM received: saved" in output


def test_syncbn_in_one_process(data_root, tmp_path, capsys):
    status, out, err = _train_in_process(capsys, "--config-file", "configs/det/shapes/mask_rcnn_syncbn_tiny.yaml",
                                         "--skip-test", *_opts(data_root, tmp_path, "SOLVER.MAX_ITER", "1"))
    assert status == 0, err
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_final.pth")
    assert "iter: 1  loss: " in (tmp_path / "log.txt").read_text()


def test_a_nan_loss_exits_3_and_keeps_the_last_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    real_build = launch.build_detection_model

    def poisoned(cfg):
        model = real_build(cfg)
        calls = []

        def nan_on_second_call(module, args, output):
            calls.append(1)
            if len(calls) == 2:
                return {name: value * float("nan") for name, value in output.items()}
            return output

        model.register_forward_hook(nan_on_second_call)
        return model

    monkeypatch.setattr(launch, "build_detection_model", poisoned)
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, "--skip-test",
                                       *_opts(data_root, tmp_path, "SOLVER.MAX_ITER", "3",
                                              "SOLVER.CHECKPOINT_PERIOD", "1"))
    assert status == 3
    assert err.count("\n") == 1 and "non-finite training loss at iteration 2" in err
    assert "the last good checkpoint" in err and "model_0000001.pth was kept" in err
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000001.pth")
    assert not (tmp_path / "model_0000002.pth").exists()


def test_seed_sets_the_initialization_and_the_data_order(data_root, tmp_path, capsys, monkeypatch):
    real_build, real_loader = launch.build_detection_model, launch.build_train_loader
    first_weights, loader_seeds = [], []

    def recording_build(cfg):
        model = real_build(cfg)
        first_weights.append(model.backbone.body.conv1.weight.detach().clone())
        return model

    def recording_loader(options, **kwargs):
        loader_seeds.append(options.seed)
        return real_loader(options, **kwargs)

    monkeypatch.setattr(launch, "build_detection_model", recording_build)
    monkeypatch.setattr(launch, "build_train_loader", recording_loader)
    for run, seed in enumerate(("0", "0", "5")):
        status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, "--skip-test",
                                           *_opts(data_root, tmp_path / str(run), "SOLVER.MAX_ITER", "1", "SEED", seed))
        assert status == 0, err
    assert loader_seeds == [0, 0, 5]
    assert torch.equal(first_weights[0], first_weights[1])
    assert not torch.allclose(first_weights[0], first_weights[2])


@pytest.mark.parametrize("case, extra, message", [
    ("weight-catalog", ["MODEL.WEIGHT", "catalog://ImageNetPretrained/MSRA/R-50"], "expected the file"),
    ("weight-url", ["MODEL.WEIGHT", "https://example.com/r50.pth"], "only local files"),
    ("weight-missing", ["MODEL.WEIGHT", "/nonexistent/r50.pth"], "no such file"),
    ("batch", ["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH 0 is global and must be a positive multiple"),
    ("test-batch", ["TEST.IMS_PER_BATCH", "0"], "TEST.IMS_PER_BATCH 0"),
    ("device", ["MODEL.DEVICE", "tpu"], "MODEL.DEVICE 'tpu'"),
    ("unknown-key", ["SOLVER.BASE_LRR", "0.1"], "did you mean SOLVER.BASE_LR"),
    ("dataset", ["DATASETS.TRAIN", '("coco_2099_train",)'], "registered: coco_2014_minival"),
    ("expected-malformed", ["TEST.EXPECTED_RESULTS", "[['bbox', 'AP', 0.3]]"], "write [task, metric, [mean, std]]"),
    ("expected-skip-test", ["TEST.EXPECTED_RESULTS", "[['bbox', 'AP', [0.3, 0.01]]]", "--skip-test"],
     "TEST.EXPECTED_RESULTS is checked after the final evaluation, which --skip-test skips"),
])
def test_bad_input_is_one_line_exit_2_before_writing(data_root, tmp_path, capsys, monkeypatch, case, extra, message):
    monkeypatch.setenv("MABN_WEIGHTS_DIR", str(tmp_path / "weights"))  # an empty weights folder
    out = tmp_path / "out"
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, *_opts(data_root, out, *extra))
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_final_metrics_outside_expected_results_exit_4(data_root, tmp_path, capsys):
    """maskrcnn-benchmark's sanity check after the final evaluation: a miss ends the run with exit
    status 4 and one error line, after the checkpoint and the metrics are written."""
    out = tmp_path / "out"
    impossible = "[['bbox', 'AP', [0.9, 0.001]], ['segm', 'AP', [0.0, 1.0]]]"
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, *_opts(
        data_root, out, "SOLVER.MAX_ITER", "1", "TEST.EXPECTED_RESULTS", impossible))
    line = err[err.find("error: "):]  # after the progress bars
    assert status == 4 and err.count("error:") == 1 and line.endswith("\n") and line.count("\n") == 1
    assert line.startswith("error: TEST.EXPECTED_RESULTS not met (sigma_tol 4): coco_2017_val bbox AP ")
    assert "outside (0.8960, 0.9040)" in line and "segm" not in line
    log = (out / "log.txt").read_text()
    assert "FAIL: coco_2017_val bbox > AP sanity check" in log and "PASS: coco_2017_val segm > AP sanity check" in log
    assert (out / "model_final.pth").is_file() and json.loads((out / "metrics.json").read_text())
    status = launch.test_net_main(["--config-file", TINY_CONFIG, "--ckpt", str(out / "model_final.pth"),
                                   *_opts(data_root, tmp_path / "eval", "TEST.EXPECTED_RESULTS",
                                          "[['bbox', 'AP', [0.0, 1.0]]]")])
    assert status == 0, capsys.readouterr().err
    assert "PASS: coco_2017_val bbox > AP" in (tmp_path / "eval" / "log.txt").read_text()


def test_missing_data_names_the_layout(tmp_path, capsys):
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, *_opts(str(tmp_path), tmp_path / "out"))
    assert status == 2 and err.count("\n") == 1 and "coco/annotations/instances_train2017.json" in err, err
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_in_use(data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, *_opts(data_root, tmp_path / "file"))
    assert status == 2 and "is a file" in err and (tmp_path / "file").read_text() == "x"
    with FolderLock(str(tmp_path / "busy"), "OUTPUT_DIR"):
        status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG, *_opts(data_root, tmp_path / "busy"))
    assert status == 2 and "in use by another run" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path / "busy")) == [".lock"]


def test_test_net_without_weights_or_with_a_remote_one(data_root, tmp_path, capsys):
    status = launch.test_net_main(["--config-file", TINY_CONFIG, *_opts(data_root, tmp_path / "out")])
    assert status == 2 and "no weights to evaluate" in capsys.readouterr().err
    status = launch.test_net_main(["--config-file", TINY_CONFIG, "--ckpt", "http://host/model.pth",
                                   *_opts(data_root, tmp_path / "out")])
    assert status == 2 and "only local files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cuda_device_without_cuda(data_root, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    status, _, err = _train_in_process(capsys, "--config-file", TINY_CONFIG,
                                       *_opts(data_root, tmp_path / "out", "MODEL.DEVICE", "cuda"))
    assert status == 2 and "CUDA is not available here; pass MODEL.DEVICE cpu" in err
