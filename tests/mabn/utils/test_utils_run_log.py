"""mabn.utils.run_log: log files, console, TensorBoard, progress bars."""
from __future__ import annotations

import glob
import os
import re
import time

import pytest

import mabn.utils.run_log
from mabn.utils.run_log import RunLog, claim_log_path


def test_log_file_names_never_collide(tmp_path, monkeypatch):
    moment = time.struct_time((2026, 3, 4, 5, 6, 7, 0, 63, 0))
    monkeypatch.setattr(mabn.utils.run_log.time, "localtime", lambda *args: moment)
    paths = [os.path.basename(claim_log_path(str(tmp_path), "log.train")) for _ in range(3)]
    assert paths == ["log.train-2026-3-4-5-6-7", "log.train-2026-3-4-5-6-7.1", "log.train-2026-3-4-5-6-7.2"]
    assert sorted(os.listdir(tmp_path)) == paths


def test_two_logs_in_one_folder_write_two_files(tmp_path):
    with RunLog(str(tmp_path), is_main=True, logger_name="test_a", file_prefix="log.train", tensorboard_dir=None) as first:
        first.info("first run")
    with RunLog(str(tmp_path), is_main=True, logger_name="test_a", file_prefix="log.train", tensorboard_dir=None) as second:
        second.info("second run")
    texts = sorted(open(p).read() for p in glob.glob(str(tmp_path / "log.train-*")))
    assert len(texts) == 2 and any("first run" in t and "second" not in t for t in texts)
    assert re.fullmatch(r"\[\d\d \d\d:\d\d:\d\d\] second run\n", [t for t in texts if "second" in t][0])


def test_fixed_file_name_is_appended_to(tmp_path):
    for message in ("first run", "second run"):
        with RunLog(str(tmp_path), is_main=True, logger_name="test_d", file_prefix=None, file_name="log.txt",
                    tensorboard_dir=None, progress=False) as log:
            log.info(message)
        assert log.path == str(tmp_path / "log.txt")
    with RunLog(str(tmp_path), is_main=False, rank=1, logger_name="test_d", file_prefix=None, file_name="log.txt"):
        pass
    assert os.listdir(tmp_path) == ["log.txt"]
    assert re.fullmatch(r"\[\d\d \d\d:\d\d:\d\d\] first run\n\[\d\d \d\d:\d\d:\d\d\] second run\n",
                        (tmp_path / "log.txt").read_text())


def test_file_prefix_and_file_name_together_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="file_prefix=None"):
        RunLog(str(tmp_path), is_main=True, logger_name="test_e", file_prefix="log.train", file_name="log.txt")
    assert not os.listdir(tmp_path)

def test_only_rank_0_writes(tmp_path, capsys):
    log = RunLog(str(tmp_path / "other"), is_main=False, rank=2, logger_name="test_b")
    log.info("hidden")
    log.warning("shown")
    log.scalar("x", 1.0, 0)
    with log.progress(3, desc="x") as bar:
        bar.update()
    log.close()
    assert capsys.readouterr().out.endswith("] shown\n") and not (tmp_path / "other").exists()


def test_tensorboard_scalars(tmp_path):
    with RunLog(str(tmp_path), is_main=True, logger_name="test_c", file_prefix=None, progress=False) as log:
        log.scalars({"a": 1.0, "b": 2.0}, step=3)
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")) and not glob.glob(str(tmp_path / "log.*"))
