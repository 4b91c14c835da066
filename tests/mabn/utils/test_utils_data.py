"""mabn.utils.data: exact evaluation shards, one-line image decoding errors, generated datasets
written once into the cache."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from mabn.utils.data import ShardSampler, build_once, default_cache_dir, load_bgr
from mabn.utils.errors import CorruptImageError


@pytest.mark.parametrize("num_samples, world_size", [(11, 4), (3, 4), (0, 2), (8, 1)])
def test_shards_cover_every_sample_exactly_once(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    assert [len(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_load_bgr_reads_a_colour_image(tmp_path):
    image = np.zeros((6, 9, 3), np.uint8)
    image[..., 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "red.png"), image)
    decoded = load_bgr(str(tmp_path / "red.png"))
    assert decoded.shape == (6, 9, 3) and decoded.dtype == np.uint8 and (decoded == image).all()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", b"", "cannot decode image file '.*empty.jpg' \\(corrupt or not an image\\)"),
    ("bad.png", b"not a png at all", "cannot decode image file '.*bad.png' \\(corrupt or not an image\\)"),
    ("cut.png", b"\x89PNG\r\n\x1a\n cut off", "cannot decode image file '.*cut.png'"),
])
def test_load_bgr_names_an_undecodable_file_in_one_line(tmp_path, capfd, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorruptImageError, match=reason) as error:
        load_bgr(str(tmp_path / name))
    assert "\n" not in str(error.value)
    assert capfd.readouterr().err == ""  # OpenCV's own log lines are silenced...
    assert cv2.utils.logging.getLogLevel() != cv2.utils.logging.LOG_LEVEL_SILENT  # ...and the level restored


def test_load_bgr_names_a_missing_file(tmp_path):
    with pytest.raises(CorruptImageError, match="cannot read image file '.*nothere.png'"):
        load_bgr(str(tmp_path / "nothere.png"))


def test_load_bgr_names_the_size_of_an_image_too_large_for_opencv(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((200, 300, 3), np.uint8))
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "1000")  # as OpenCV would refuse it (read at its start)
    monkeypatch.setattr(cv2, "imdecode", lambda data, flags: None)
    with pytest.raises(CorruptImageError, match=r"'.*wide.png' is too large to decode \(300x200 = 60000 pixels; "
                                                r"OpenCV decodes at most 1000\): downscale it"):
        load_bgr(str(tmp_path / "wide.png"))


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MABN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MABN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mabn"


def _writer(calls):
    def write(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir()
        (folder / "data.txt").write_text(f"call {len(calls)}")
        (folder / "meta.json").write_text(json.dumps({"calls": len(calls)}))
    return write


def test_build_once_writes_once_and_then_reuses(tmp_path):
    calls, logged = [], []
    target = tmp_path / "cache" / "set-v1"
    assert build_once(target, _writer(calls), "the test set", logged.append) == target
    assert (target / "data.txt").read_text() == "call 1" and len(calls) == 1
    assert calls[0] != target and calls[0].parent == target.parent  # written elsewhere, renamed into place
    assert logged == [f"writing the test set to {target}"]
    assert build_once(target, _writer(calls), "the test set", logged.append) == target
    assert len(calls) == 1 and len(logged) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["set-v1", "set-v1.lock"]  # no temporary left


def test_build_once_from_many_threads_writes_once(tmp_path):
    calls = []
    target = tmp_path / "set"
    threads = [threading.Thread(target=build_once, args=(target, _writer(calls), "x", lambda line: None))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (target / "data.txt").read_text() == "call 1"


def test_build_once_replaces_a_leftover_target_without_marker(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "stale.txt").write_text("half written by something else")
    calls = []
    build_once(target, _writer(calls), "x", lambda line: None)
    assert len(calls) == 1 and sorted(p.name for p in target.iterdir()) == ["data.txt", "meta.json"]


def test_build_once_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "set"

    def fail(folder: Path) -> None:
        folder.mkdir()
        (folder / "part.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, fail, "x", lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["set.lock"]
    with pytest.raises(RuntimeError, match="did not write meta.json"):
        build_once(target, lambda folder: folder.mkdir(), "x", lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["set.lock"]
