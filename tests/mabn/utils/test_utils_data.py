"""mabn.utils.data: exact evaluation shards, the per-rank permutation stream of the training
samplers, the loader workers' start method and SIGTERM policy, one-line image decoding errors,
generated datasets written once into the cache."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

import mabn.utils.data
from mabn.utils.data import (RankPermutations, ShardSampler, build_once, default_cache_dir, load_bgr,
                             worker_options)
from mabn.utils.errors import CorruptImageError, UserError


@pytest.mark.parametrize("num_samples, world_size", [(11, 4), (3, 4), (0, 2), (8, 1)])
def test_shards_cover_every_sample_exactly_once(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    assert [len(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_permutations_follow_their_definition():
    """Pass ``p`` of stream ``key``: the permutation from ``default_rng([*key, p])``, cut to a
    multiple of the world size, dealt round-robin (the orders cls and det resume on)."""
    n, world = 11, 3
    for rank in range(world):
        permutations = RankPermutations(n, rank, world)
        for key in ((4,), (4, 2)):
            for pass_index in range(3):
                order = np.random.default_rng([*key, pass_index]).permutation(n)
                assert permutations.share(key, pass_index).tolist() == order[:9][rank::3].tolist()


def test_rank_permutations_are_disjoint_within_a_pass_and_cover_it():
    shares = [RankPermutations(11, rank, 3).share((7, 1), 0).tolist() for rank in range(3)]
    everything = sum(shares, [])
    assert [len(s) for s in shares] == [3, 3, 3] and len(set(everything)) == 9 and set(everything) <= set(range(11))


def test_rank_permutations_stream_and_head_agree_across_passes():
    permutations = RankPermutations(10, 1, 2)
    stream = permutations.stream((3,))
    prefix = [next(stream) for _ in range(17)]  # 4 passes of 5
    assert all(type(i) is int for i in prefix)
    assert permutations.head((3,), 17).tolist() == prefix and permutations.head((3,), 0).tolist() == []
    assert sorted(prefix[:5] + RankPermutations(10, 0, 2).head((3,), 5).tolist()) == list(range(10))
    assert prefix[:5] != prefix[5:10]  # a new permutation each pass
    assert permutations.head((3, 1), 5).tolist() != permutations.head((3, 2), 5).tolist()  # keys name streams


def test_rank_permutations_need_a_sample_per_rank():
    with pytest.raises(UserError, match="the training set has 3 images, fewer than the 4 processes"):
        RankPermutations(3, 0, 4)


def test_worker_options_forkserver_and_the_owner_bound():
    assert worker_options(0) == {"num_workers": 0}
    options = worker_options(2, ["mabn.utils.data"])
    assert options["num_workers"] == 2
    assert options["multiprocessing_context"].get_start_method() == "forkserver"
    init = options["worker_init_fn"]
    assert isinstance(init, functools.partial) and init.func is mabn.utils.data._worker_init
    assert init.args == (os.getpid(),)


_WORKERS_SCRIPT = """
    import multiprocessing
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from torch.utils.data import DataLoader, Dataset

    from mabn.utils.data import worker_options


    class Pids(Dataset):
        def __len__(self):
            return 100000

        def __getitem__(self, index):
            return os.getpid()


    def bystander(path):
        \"\"\"A daemonic child that is not a loader worker: ends on SIGTERM, leaving a note.\"\"\"
        def note(*_):
            with open(path, "w") as stream:
                stream.write("SIGTERM")
            os._exit(0)

        signal.signal(signal.SIGTERM, note)
        while True:
            time.sleep(0.05)


    if __name__ == "__main__":
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # the trainer runs threads
        other = multiprocessing.get_context("spawn").Process(target=bystander, args=(sys.argv[1],), daemon=True)
        other.start()
        loader = DataLoader(Pids(), batch_size=1, persistent_workers=True, **worker_options(2))
        batches = iter(loader)
        workers = {int(next(batches)) for _ in range(8)}
        assert len(workers) == 2, workers
        for pid in workers:  # the job's SIGTERM, sent by another process: the workers keep serving
            subprocess.run(["kill", "-TERM", str(pid)], check=True)
        time.sleep(0.5)
        assert {int(next(batches)) for _ in range(20)} == workers
        print("workers alive after an outside SIGTERM", flush=True)
        victim = min(workers)  # the owner's SIGTERM (DataLoader's terminate()) ends a worker, status 0
        os.kill(victim, signal.SIGTERM)
        (process,) = [p for p in multiprocessing.active_children() if p.pid == victim]
        process.join(60)
        assert process.exitcode == 0, process.exitcode
        print("worker ended by its owner's SIGTERM", flush=True)
        # Exiting with the loader still open ends the other worker instead of waiting for it forever.
"""


def test_loader_workers_outlive_a_job_sigterm_end_on_the_owners_and_never_hold_up_the_exit(tmp_path):
    """In a fresh interpreter (it starts forkserver workers): a SIGTERM from another process leaves
    the workers serving, one from the owner ends a worker, the interpreter exits with its loader
    still open, and an unrelated daemonic child ends the ordinary way (SIGTERM, not SIGKILL)."""
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent(_WORKERS_SCRIPT))
    note = tmp_path / "bystander.txt"
    done = subprocess.run([sys.executable, str(script), str(note)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["workers alive after an outside SIGTERM", "worker ended by its owner's SIGTERM"]
    assert note.read_text() == "SIGTERM"


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
