"""cls.train.main in this process (no loader workers, no process group: those run in a subprocess):
exact resume, stops, bad inputs, outputs (metrics.json among them), statistics, export."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cls_helpers import REPO, TINY, run_python

import cls.engine
from cls.engine import MetricsWriter
from cls.metrics import Meter
from cls.train import main

MABN = ["--batch_size", "16", "--norm", "mabn", "--norm_batch", "2", "--ma_batch", "4", "--warmup_iters", "2",
        "--iters_per_epoch", "3"]


def _train(save, *extra, base=MABN):
    return main([*TINY, *base, "--save", str(save), *extra])


def _checkpoint(save):
    return torch.load(Path(save) / "checkpoint.pth", map_location="cpu", weights_only=True)


def _assert_same_training_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])
    # _step_count only feeds torch's step-order warning; a resume positions the schedule afresh
    schedule_a, schedule_b = ({k: v for k, v in state["scheduler"].items() if k != "_step_count"} for state in (a, b))
    assert schedule_a == schedule_b and (a["epoch"], a["step_in_epoch"]) == (b["epoch"], b["step_in_epoch"])
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]


def _log_lines(save, prefix):
    """Lines of the newest log file in ``save`` that contain ``prefix``."""
    path = max(glob.glob(os.path.join(save, "log.train-*")), key=os.path.getmtime)
    return [line for line in Path(path).read_text().splitlines() if prefix in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs straight, checkpoint after each (the reference for the resume tests)."""
    save = tmp_path_factory.mktemp("straight")
    assert _train(save, "--total_epoch", "2", "--save_interval", "1") == 0
    return save


@pytest.mark.parametrize("norm", ["mabn", "ghost_bn"])
def test_exact_resume_at_an_epoch_boundary(trained, tmp_path, norm):
    base = MABN if norm == "mabn" else ["--batch_size", "16", "--norm", "bn", "--norm_batch", "4", "--iters_per_epoch", "3"]
    reference = trained
    if norm != "mabn":
        reference = tmp_path / "straight"
        assert _train(reference, "--total_epoch", "2", base=base) == 0
    save = tmp_path / "resumed"
    assert _train(save, "--total_epoch", "1", "--save_interval", "1", base=base) == 0
    first = _checkpoint(save)
    assert (first["epoch"], first["iteration"], first["step_in_epoch"]) == (1, 1, 0)
    assert _train(save, "--total_epoch", "2", "--checkpoint_dir", str(save / "checkpoint.pth"), base=base) == 0
    _assert_same_training_state(_checkpoint(reference), _checkpoint(save))


def test_sigterm_inside_an_epoch_saves_and_resumes_exactly(trained, tmp_path, monkeypatch):
    original = cls.engine.Trainer.run_step

    def step(self):
        if self.state.global_step == 4:  # epoch 2, second iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(cls.engine.Trainer, "run_step", step)
    save = tmp_path / "stopped"
    assert _train(save, "--total_epoch", "2", "--save_interval", "1") == 0
    stopped = _checkpoint(save)
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 2, 5)
    monkeypatch.setattr(cls.engine.Trainer, "run_step", original)
    assert _train(save, "--total_epoch", "2", "--checkpoint_dir", str(save)) == 0
    _assert_same_training_state(_checkpoint(trained), _checkpoint(save))
    # The epoch line of the interrupted epoch covers all of it, as in the straight run.
    assert _log_lines(save, "TRAIN Epoch 2")[-1].split("] ", 1)[1] == _log_lines(trained, "TRAIN Epoch 2")[0].split("] ", 1)[1]


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    original = cls.engine.label_smoothing_loss

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(cls.engine, "label_smoothing_loss", loss)
    save = tmp_path / "nan"
    _train(save, "--total_epoch", "1", "--save_interval", "1")  # a good checkpoint first
    before = (save / "checkpoint.pth").read_bytes()
    calls["n"] = 3  # the 2nd training iteration of the next run is NaN
    capsys.readouterr()
    rc = _train(save, "--total_epoch", "3", "--save_interval", "1", "--checkpoint_dir", str(save))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and err[0].startswith("error: non-finite training loss (nan")
    assert "epoch 2, iteration 2/3" in err[0] and "was kept" in err[0]
    assert (save / "checkpoint.pth").read_bytes() == before


def _image_folder(root: Path, corrupt: bool):
    for klass in ("a", "b"):
        (root / klass).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(root / klass / f"{i}.png"), np.full((40, 40, 3), 60 * i + 20, np.uint8))
    if corrupt:
        (root / "b" / "1.png").write_bytes(b"\x89PNG truncated garbage")


@pytest.fixture()
def folders(tmp_path):
    _image_folder(tmp_path / "good", corrupt=False)
    _image_folder(tmp_path / "bad", corrupt=True)
    (tmp_path / "empty").mkdir()
    return tmp_path


BAD_INPUTS = {
    "missing train dir": (["--train_dir", "{tmp}/nowhere", "--val_dir", "{tmp}/good"], "--train_dir {tmp}/nowhere: no such directory"),
    "empty val dir": (["--train_dir", "{tmp}/good", "--val_dir", "{tmp}/empty"], "--val_dir {tmp}/empty: no images found"),
    "corrupt image": (["--train_dir", "{tmp}/bad", "--val_dir", "{tmp}/good", "--batch_size", "4", "--norm", "bn"],
                      "cannot decode image file '{tmp}/bad/b/1.png'"),
    "corrupt image in a worker": (["--train_dir", "{tmp}/bad", "--val_dir", "{tmp}/good", "--batch_size", "4",
                                   "--norm", "bn", "--workers", "1"], "cannot decode image file '{tmp}/bad/b/1.png'"),
    "unknown norm": (["--norm", "batchnorm"], "argument --norm: invalid choice: 'batchnorm' (choose from "),
    "unknown arch": (["--arch", "vgg16"], "invalid choice: 'vgg16' (choose from resnet18, resnet34, resnet50, "
                                          "resnet101, resnet8, resnet14, resnet20)"),
    "norm batch": (["--batch_size", "16", "--norm", "bn", "--norm_batch", "5"], "not divisible by --norm_batch 5"),
    "gpu_num": (["--gpu_num", "2"], "--gpu_num=2 but the world size is 1"),
    "test_only without checkpoint": (["--test_only"], "--test_only needs --checkpoint_dir"),
    "missing checkpoint": (["--test_only", "--checkpoint_dir", "{tmp}/none.pth"], "no such checkpoint file"),
    "not a checkpoint": (["--test_only", "--checkpoint_dir", "{tmp}/good/a/0.png"], "not a readable checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(folders, capsys, case):
    argv, message = BAD_INPUTS[case]
    tmp = str(folders)
    argv = [a.replace("{tmp}", tmp) for a in argv]
    save = folders / "out"
    argv = [*TINY, "--batch_size", "16", "--iters_per_epoch", "1", "--total_epoch", "1", *argv, "--save", str(save)]
    if "--workers" in argv:  # DataLoader workers are forked: never from the test process
        result = run_python(["-m", "cls.train", *argv])
        rc, err = result.returncode, result.stderr.strip().splitlines()
    else:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    unquoted = message.replace("{tmp}", tmp).replace("'", "")  # argparse quotes choices in some versions
    assert len(err) == 1 and err[0].startswith("error: ") and unquoted in err[0].replace("'", ""), err
    if case.startswith("corrupt"):
        assert not (save / "checkpoint.pth").exists()  # the log may exist; nothing was saved
    else:
        assert not save.exists()


def test_checkpoint_of_another_architecture_or_norm(trained, tmp_path, capsys):
    checkpoint = str(trained / "checkpoint.pth")
    before = Path(checkpoint).read_bytes()
    rc = main([*TINY, "--arch", "resnet18", "--test_only", "--checkpoint_dir", checkpoint, "--save", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "other values of flags" in err[0] and "--arch resnet20 (now resnet18)" in err[0]
    rc = main([*TINY, "--norm", "bn", "--test_only", "--checkpoint_dir", checkpoint, "--save", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--norm mabn (now bn)" in err[0]
    # Without stored flags (a published checkpoint) the state dict itself is compared.
    published = tmp_path / "published.pth"
    torch.save({"model": _checkpoint(trained)["model"]}, published)
    rc = main([*TINY, "--arch", "resnet18", "--test_only", "--checkpoint_dir", str(published), "--save", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "does not fit this model" in err[0] and "missing keys: layer4." in err[0] and "unexpected keys:" in err[0]
    assert not (tmp_path / "o").exists() and Path(checkpoint).read_bytes() == before


def test_outputs_log_format_and_test_only(trained, tmp_path):
    (log,) = glob.glob(str(trained / "log.train-*"))
    assert re.fullmatch(r"log\.train-\d{4}-\d{1,2}-\d{1,2}-\d{1,2}-\d{1,2}-\d{1,2}", os.path.basename(log))
    train_line = _log_lines(trained, "TRAIN Epoch 1")[0]
    assert re.fullmatch(r"\[\d\d \d\d:\d\d:\d\d\] TRAIN Epoch 1: lr = 0\.100000,\tloss = \d+\.\d{6},\t"
                        r"Top-1 err = \d+\.\d{6},\tTop-5 err = \d+\.\d{6},\t", train_line)
    test_after_training = _log_lines(trained, "TEST:")[-1].split("] ", 1)[1]
    assert re.fullmatch(r"TEST: loss = \d+\.\d{6},\tTop-1 err = \d+\.\d{6},\tTop-5 err = \d+\.\d{6},\t", test_after_training)
    checkpoint = _checkpoint(trained)
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    assert {"model", "optimizer", "scheduler", "iteration", "rank_states", "args"} <= set(checkpoint)
    assert glob.glob(str(trained / "tb" / "events.out.tfevents.*"))
    assert not glob.glob(str(trained / "*.tmp"))
    # --test_only on the checkpoint reproduces the evaluation that ended the training.
    save = tmp_path / "test"
    assert main([*TINY, *MABN, "--test_only", "--checkpoint_dir", str(trained / "checkpoint.pth"), "--save", str(save)]) == 0
    assert _log_lines(save, "TEST:")[0].split("] ", 1)[1] == test_after_training
    assert not (save / "metrics.json").exists()  # written by training runs only


def _metrics(save):
    return json.loads((Path(save) / "metrics.json").read_text())


def _test_line_numbers(entry):
    return f"TEST: loss = {entry['loss']:.6f},\tTop-1 err = {entry['top1_err']:.6f},\tTop-5 err = {entry['top5_err']:.6f},\t"


def test_metrics_json_holds_the_final_evaluation(trained):
    (entry,) = _metrics(trained)  # --eval_interval 0: the evaluation after training only
    assert set(entry) == {"epoch", "loss", "top1_err", "top5_err"} and entry["epoch"] == 2
    assert _test_line_numbers(entry) == _log_lines(trained, "TEST:")[-1].split("] ", 1)[1]
    assert not glob.glob(str(trained / "*.tmp*"))


def test_metrics_json_one_entry_per_evaluation_and_resume_drops_later_ones(tmp_path):
    straight = tmp_path / "straight"
    assert _train(straight, "--total_epoch", "2", "--eval_interval", "1") == 0
    entries = _metrics(straight)
    assert [e["epoch"] for e in entries] == [1, 2]
    logged = [line.split("] ", 1)[1] for line in _log_lines(straight, "TEST:")]
    assert [_test_line_numbers(e) for e in entries] == logged
    save = tmp_path / "resumed"
    assert _train(save, "--total_epoch", "1", "--save_interval", "1", "--eval_interval", "1") == 0
    assert _metrics(save) == entries[:1]
    # An earlier, longer run in the folder left entries after the checkpoint being resumed: dropped.
    stale = [{"epoch": e, "loss": 9.0, "top1_err": 99.0, "top5_err": 99.0} for e in (2, 3)]
    (save / "metrics.json").write_text(json.dumps(entries[:1] + stale))
    assert _train(save, "--total_epoch", "2", "--eval_interval", "1", "--checkpoint_dir", str(save)) == 0
    assert _metrics(save) == entries  # bit-exact resume: the same numbers as the straight run


def test_metrics_writer_rank_0_only_and_unreadable_files(tmp_path):
    meter = Meter()
    meter.add(6.0, 2.0, 3.0, 4.0)
    MetricsWriter(str(tmp_path), 0, is_main=False)(1, meter)
    assert not (tmp_path / "metrics.json").exists()
    (tmp_path / "metrics.json").write_text("not json")
    writer = MetricsWriter(str(tmp_path), 5, is_main=True)
    writer(1, meter)
    assert _metrics(tmp_path) == [{"epoch": 1, "loss": 1.5, "top1_err": 50.0, "top5_err": 25.0}]
    assert MetricsWriter(str(tmp_path), 0, is_main=True).entries == []  # resumed at 0: nothing kept


def test_checkpoint_with_only_the_published_keys(trained, tmp_path):
    full = _checkpoint(trained)
    published = {k: full[k] for k in ("model", "optimizer", "scheduler")}
    published["iteration"] = 1
    path = tmp_path / "published.pth"
    torch.save(published, path)
    save = tmp_path / "continued"
    assert _train(save, "--total_epoch", "2", "--checkpoint_dir", str(path)) == 0
    assert _log_lines(save, "TRAIN Epoch 2") and not _log_lines(save, "TRAIN Epoch 1")
    assert _checkpoint(save)["epoch"] == 2


def test_export_folded(trained, tmp_path):
    path = tmp_path / "folded.pt"
    save = tmp_path / "export"
    assert main([*TINY, *MABN, "--test_only", "--checkpoint_dir", str(trained), "--save", str(save),
                 "--export_folded", str(path)]) == 0
    folded = torch.load(path, weights_only=False)
    line = _log_lines(save, "exported the folded model")[0]
    assert float(line.rsplit(" ", 1)[1].rstrip(")")) < 1e-2
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert folded(torch.rand(2, 3, 32, 32) * 255).shape == (2, 10)


def test_record_statistics_and_plot(tmp_path):
    runs = []
    for batch in (4, 16):
        save = tmp_path / f"bs{batch}"
        base = ["--batch_size", str(batch), "--norm", "bn", "--iters_per_epoch", "4", "--total_epoch", "1"]
        assert _train(save, "--record_statistics", base=base) == 0
        events = glob.glob(str(save / "statistics" / f"bs_{batch}" / "events.out.tfevents.*"))
        assert events
        runs.append(str(save))
    out = tmp_path / "figures"
    result = run_python([str(REPO / "scripts" / "plot_statistics.py"), *runs, "--out", str(out)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    pngs = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.png")))
    assert pngs == sorted(f"bn1_{s}_{k}.png" for s in ("mu_B", "sigma2_B", "g_B", "Psi_B") for k in ("channel0", "mean_abs"))
    assert all(os.path.getsize(out / p) > 1000 for p in pngs)

    from cls.statistics_plot import load_scalars

    series = load_scalars(str(tmp_path / "bs4" / "statistics" / "bs_4"))
    steps, values = series["layer2.0.bn1/sigma2_B/channel0"]
    assert steps == [0, 1, 2, 3] and all(np.isfinite(values))
