"""The trainer as users launch it: torchrun with 2 gloo processes, torch.distributed.launch from
``cls/``, ``python -m cls.train``, ``python cls/train.py`` from elsewhere, SIGTERM, exit codes."""
from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cls_helpers import REPO, TINY_DATA, TRAIN_SCRIPT, describe, run_python, subprocess_env, torchrun

# The two-process torchrun command line of docs/cls.md (plus the tiny dataset and no loader workers).
DOCS_RUN = ["--arch", "resnet20", "--image_size", "32", "--batch_size", "16", "--norm", "mabn", "--norm_batch", "2",
            "--ma_batch", "8", "--total_epoch", "2", "--iters_per_epoch", "3", "--gpu_num", "2",
            "--workers", "0", "--no-progress", *TINY_DATA]


def _without_gpu_num(argv):
    index = argv.index("--gpu_num")
    return argv[:index] + argv[index + 2:]


def _test_numbers(text: str):
    """(loss, top-1 err, top-5 err) of the last TEST line."""
    return [float(v) for v in re.findall(r"= (\d+\.\d+)", _test_line(text))]


def _test_line(text: str) -> str:
    lines = [line.split("] ", 1)[1] for line in text.splitlines() if "TEST: loss" in line]
    assert lines, text
    return lines[-1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("torchrun")
    result = torchrun(2, [*DOCS_RUN, "--save", str(save)])
    assert result.returncode == 0, describe(result)
    return save, result


def test_two_process_gloo_run_then_test_only(two_rank_run):
    save, result = two_rank_run
    assert "2 process(es) on cpu (gloo), 8 images per process" in result.stdout
    assert result.stdout.count("TRAIN Epoch") == 2
    checkpoint = torch.load(save / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["world_size"] == 2
    tested = torchrun(2, [*DOCS_RUN, "--save", str(save), "--test_only", "--checkpoint_dir",
                          str(save / "checkpoint.pth")])
    assert tested.returncode == 0, describe(tested)
    # Whole validation set, sharded over 2 ranks and reduced: the same numbers as after training.
    assert _test_line(tested.stdout) == _test_line(result.stdout)


def test_per_rank_mabn_buffers_differ(two_rank_run):
    save, _ = two_rank_run
    checkpoint = torch.load(save / "checkpoint.pth", map_location="cpu", weights_only=True)
    rank0, rank1 = (state["buffers"] for state in checkpoint["rank_states"])
    mabn_keys = [k for k in rank0 if k.endswith("buffer_x2")]
    assert len(mabn_keys) == 21
    for key in mabn_keys:
        assert not torch.equal(rank0[key], rank1[key]), key  # broadcast_buffers=False: rank-local statistics
        running = key.replace("buffer_x2", "running_var")
        assert not torch.equal(rank0[running], rank1[running])
    for key in rank0:  # the saved model is rank 0's
        assert torch.equal(checkpoint["model"][key], rank0[key])


def test_syncbn_statistics_agree_across_ranks(tmp_path):
    argv = ["--arch", "resnet20", "--image_size", "32", "--batch_size", "8", "--norm", "syncbn", "--total_epoch", "1",
            "--iters_per_epoch", "2", "--workers", "0", "--no-progress", *TINY_DATA, "--save", str(tmp_path)]
    result = torchrun(2, argv)
    assert result.returncode == 0, describe(result)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    rank0, rank1 = (state["buffers"] for state in checkpoint["rank_states"])
    keys = [k for k in rank0 if k.endswith("running_mean")]
    assert len(keys) == 21
    for key in keys:  # statistics of the global batch: identical on both ranks
        torch.testing.assert_close(rank0[key], rank1[key], rtol=1e-5, atol=1e-6)


def test_published_launch_line_from_cls_directory(two_rank_run, tmp_path):
    """``python -m torch.distributed.launch --nproc_per_node=1 train.py --gpu_num=1 ... --test_only`` from cls/."""
    save, result = two_rank_run
    argv = _without_gpu_num(DOCS_RUN)
    tested = torchrun(1, [*argv, "--gpu_num=1", "--save", str(tmp_path), "--checkpoint_dir", str(save / "checkpoint.pth"),
                          "--test_only"], cwd=REPO / "cls", launcher="torch.distributed.launch", script="train.py")
    assert tested.returncode == 0, describe(tested)
    assert "1 process(es) on cpu (gloo)" in tested.stdout
    # One shard instead of two: the same images, summed in another order.
    assert _test_numbers(tested.stdout) == pytest.approx(_test_numbers(result.stdout), rel=1e-5)


def test_module_and_file_entry_points(two_rank_run, tmp_path):
    save, result = two_rank_run
    argv = _without_gpu_num(DOCS_RUN)
    as_module = run_python(["-m", "cls.train", *argv, "--save", str(tmp_path / "m"), "--test_only",
                            "--checkpoint_dir", str(save)], cwd=REPO)
    assert as_module.returncode == 0, describe(as_module)
    assert _test_numbers(as_module.stdout) == pytest.approx(_test_numbers(result.stdout), rel=1e-5)
    bad = run_python([str(TRAIN_SCRIPT), "--norm", "foo"], cwd=tmp_path)  # from another directory
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("error: argument --norm")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    argv = [str(TRAIN_SCRIPT), "--arch", "resnet20", "--image_size", "32", "--batch_size", "8", "--norm", "bn",
            "--total_epoch", "1", "--iters_per_epoch", "100000", "--workers", "0", "--no-progress", *TINY_DATA,
            "--save", str(tmp_path)]
    process = subprocess.Popen([sys.executable, *argv], cwd=str(tmp_path), env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        for line in process.stdout:
            if "load data successfully" in line or time.time() > deadline:
                break
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert re.search(r"SIGTERM received: saved .*checkpoint\.pth at epoch 1, iteration \d+/100000", out), out
    checkpoint = torch.load(Path(tmp_path) / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["step_in_epoch"] >= 1


def test_running_a_file_in_cls_shadows_no_top_level_module():
    """``python cls/train.py`` (or ``train.py`` from ``cls/``) puts ``cls/`` first on sys.path, so a
    module there named like an installed top-level one (``config``, ``data``, ``metrics``...)
    would hide it from every library; the entry script does not edit sys.path to avoid that."""
    names = sorted(p.stem for p in (REPO / "cls").glob("*.py") if p.stem != "__init__")
    assert names and [n for n in names if importlib.util.find_spec(n) is not None] == []
