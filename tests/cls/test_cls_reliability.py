"""The trainer never loses or corrupts a run: no NaN/Inf checkpoint, resume never silently ignores a
flag, an output folder is never overwritten or shared by accident, a checkpoint cannot run code,
and both stop signals save. Every failure is one line on stderr with exit status 2 or 3."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cls_helpers import TINY, subprocess_env

import cls.engine
from cls.train import main

BN = ["--batch_size", "16", "--norm", "bn", "--iters_per_epoch", "2"]
MABN = ["--batch_size", "16", "--norm", "mabn", "--norm_batch", "2", "--ma_batch", "4", "--warmup_iters", "2",
        "--iters_per_epoch", "2"]


def _train(save, *extra, base=MABN):
    return main([*TINY, *base, "--save", str(save), *extra])


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _log_text(save) -> str:
    return "\n".join(Path(p).read_text() for p in sorted(glob.glob(os.path.join(save, "log.train-*"))))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of two iterations (MABN), checkpoint after it."""
    save = tmp_path_factory.mktemp("trained")
    assert _train(save, "--total_epoch", "1") == 0
    return save


@pytest.fixture()
def resumable(trained, tmp_path):
    """A fresh --save holding a copy of the trained checkpoint."""
    save = tmp_path / "run"
    save.mkdir()
    shutil.copy(trained / "checkpoint.pth", save / "checkpoint.pth")
    return save


def test_non_finite_state_is_never_checkpointed(tmp_path, monkeypatch, capsys):
    """A buffer turns Inf while the loss stays finite: the epoch-2 checkpoint is refused, epoch 1's stays."""
    original = cls.engine.Trainer.run_step
    kept = {}

    def step(self):
        original(self)
        if self.state.global_step == 3:  # epoch 2, first iteration (epoch 1 was saved)
            kept["bytes"] = (tmp_path / "checkpoint.pth").read_bytes()
            network = getattr(self.model, "module", self.model)
            network.bn1.running_var.fill_(float("inf"))

    monkeypatch.setattr(cls.engine.Trainer, "run_step", step)
    capsys.readouterr()
    rc = _train(tmp_path, "--total_epoch", "2", "--save_interval", "1", base=BN)
    line = _error_line(capsys)
    assert rc == 3
    assert "non-finite value in model/bn1.running_var" in line and "was kept" in line
    assert (tmp_path / "checkpoint.pth").read_bytes() == kept["bytes"]
    assert _load(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert not glob.glob(str(tmp_path / "*.tmp")) and not glob.glob(str(tmp_path / ".checkpoint.pth.*"))


def test_test_only_with_a_nan_loss_exits_3(trained, tmp_path, capsys):
    checkpoint = _load(trained / "checkpoint.pth")
    checkpoint["model"]["fc.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(checkpoint, path)
    capsys.readouterr()
    rc = main([*TINY, *MABN, "--test_only", "--checkpoint_dir", str(path), "--save", str(tmp_path / "eval")])
    assert rc == 3 and "non-finite validation loss (nan)" in _error_line(capsys)


def test_changed_safe_flags_are_applied_and_logged(resumable):
    rc = _train(resumable, "--total_epoch", "2", "--learning_rate", "0.05", "--lr_milestones", "1",
                "--checkpoint_dir", str(resumable))
    assert rc == 0
    log = _log_text(resumable)
    assert "changed since the checkpoint: --learning_rate 0.1 -> 0.05 (applied)" in log
    assert "changed since the checkpoint: --lr_milestones 30 60 90 120 -> 1 (applied)" in log
    assert "changed since the checkpoint: --total_epoch 1 -> 2 (applied)" in log
    # Epoch 2 runs after the new milestone 1: 0.05 * 0.1, not the restored scheduler's 0.1.
    assert "TRAIN Epoch 2: lr = 0.005000," in log
    saved = _load(resumable / "checkpoint.pth")
    assert saved["args"]["learning_rate"] == 0.05 and saved["scheduler"]["base_lrs"] == [0.05]
    assert all(type(v) in (bool, int, float, str, list, type(None)) for v in saved["args"].values())


def test_changed_unsafe_flags_are_refused_naming_each(resumable, capsys):
    before = (resumable / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    rc = _train(resumable, "--total_epoch", "2", "--batch_size", "8", "--seed", "1", "--ma_batch", "8",
                "--checkpoint_dir", str(resumable))
    line = _error_line(capsys)
    assert rc == 2
    for change in ("--batch_size 16 (now 8)", "--seed 0 (now 1)", "--ma_batch 4 (now 8)"):
        assert change in line
    assert "--arch, --norm or --num_classes" not in line
    # Inside an epoch the epoch length cannot change either.
    checkpoint = _load(resumable / "checkpoint.pth")
    checkpoint.update(step_in_epoch=1, global_step=3)
    inside = resumable.parent / "inside.pth"
    torch.save(checkpoint, inside)
    rc = _train(resumable, "--total_epoch", "2", "--iters_per_epoch", "3", "--checkpoint_dir", str(inside),
                "--overwrite")
    assert rc == 2 and "--iters_per_epoch 2 (now 3)" in _error_line(capsys)
    assert (resumable / "checkpoint.pth").read_bytes() == before and not glob.glob(str(resumable / "log.train-*"))


def test_a_second_run_into_a_locked_folder_fails_with_the_pid(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mabn.utils.lock import FolderLock; "
         "FolderLock(sys.argv[1], '--save').acquire(); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        rc = _train(tmp_path, "--total_epoch", "1")
        line = _error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and f"is in use by another run (pid {holder.pid}" in line
    assert not (tmp_path / "checkpoint.pth").exists()


def test_a_folder_with_a_checkpoint_is_not_overwritten_without_overwrite(resumable, capsys):
    before = (resumable / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    assert _train(resumable, "--total_epoch", "1") == 2
    line = _error_line(capsys)
    assert f"--checkpoint_dir {resumable}" in line and "--overwrite" in line
    assert (resumable / "checkpoint.pth").read_bytes() == before
    assert _train(resumable, "--total_epoch", "1", "--seed", "1", "--overwrite") == 0
    assert (resumable / "checkpoint.pth").read_bytes() != before


class _RunsCode:
    """Unpickling calls os.system (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_cannot_run_code(trained, tmp_path, capsys):
    marker = tmp_path / "ran"
    checkpoint = _load(trained / "checkpoint.pth")
    checkpoint["extra"] = _RunsCode(marker)
    path = tmp_path / "crafted.pth"
    torch.save(checkpoint, path)
    capsys.readouterr()
    rc = main([*TINY, *MABN, "--test_only", "--checkpoint_dir", str(path), "--save", str(tmp_path / "eval")])
    line = _error_line(capsys)
    assert rc == 2 and "GLOBAL posix.system" in line and "--trust_checkpoint" in line
    assert not marker.exists()


@pytest.mark.parametrize("field,value,message", [
    ("epoch", "3", "field 'epoch' is str"),
    ("model", [1, 2], "field 'model' is list"),
    ("optimizer", {"state": 1, "param_groups": "x"}, "the optimizer state does not fit this run"),
    ("rank_states", [{"buffers": 5, "rng": {}}], "rank_states[0] does not fit this run"),
])
def test_a_checkpoint_with_fields_of_the_wrong_type(resumable, capsys, field, value, message):
    checkpoint = _load(resumable / "checkpoint.pth")
    checkpoint[field] = value
    torch.save(checkpoint, resumable / "edited.pth")
    capsys.readouterr()
    rc = _train(resumable, "--total_epoch", "2", "--checkpoint_dir", str(resumable / "edited.pth"), "--overwrite")
    assert rc == 2 and message in _error_line(capsys)


def test_an_export_path_that_is_a_directory_fails_before_training(tmp_path, capsys):
    capsys.readouterr()
    rc = _train(tmp_path / "run", "--total_epoch", "1", "--export_folded", str(tmp_path))
    assert rc == 2 and "--export_folded" in _error_line(capsys)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_sigint_saves_and_exits_like_sigterm(tmp_path, monkeypatch):
    original = cls.engine.Trainer.run_step
    handler = signal.getsignal(signal.SIGINT)

    def step(self):
        if self.state.global_step == 2:  # epoch 2, first iteration
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(cls.engine.Trainer, "run_step", step)
    assert _train(tmp_path, "--total_epoch", "3", base=BN) == 0
    stopped = _load(tmp_path / "checkpoint.pth")
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 1, 3)
    assert "SIGINT received: saved" in _log_text(tmp_path) and "at epoch 2, iteration 1/2" in _log_text(tmp_path)
    assert signal.getsignal(signal.SIGINT) is handler
