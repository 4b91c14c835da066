"""cls.data: per-rank sampling without replacement, the image-folder checks and its loaders (shards and
image decoding errors: tests/mabn/utils/test_utils_data.py)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from image_files import write_black_png

import cls.data
from cls.data import TrainBatchSampler, check_image_file, load_bgr, open_image_folder
from mabn.utils.errors import CorruptImageError, UserError


def _epoch(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return [item for batch in sampler for item in batch]


def test_no_sample_twice_within_a_pass_across_ranks():
    n, world, batch, iters = 103, 3, 4, 8  # 96 = 3 ranks x 8 x 4 of the 102 usable images
    streams = [[i for i, _ in _epoch(TrainBatchSampler(n, batch, iters, rank, world, seed=1), 1)] for rank in range(world)]
    everything = [i for stream in streams for i in stream]
    assert len(everything) == len(set(everything)) == world * batch * iters


def test_reshuffled_each_epoch_and_deterministic_from_seed():
    sampler = TrainBatchSampler(50, 5, 10, seed=4)
    first, second = _epoch(sampler, 1), _epoch(sampler, 2)
    assert sorted(i for i, _ in first) == list(range(50)) and [i for i, _ in first] != [i for i, _ in second]
    assert first == _epoch(TrainBatchSampler(50, 5, 10, seed=4), 1)
    assert [i for i, _ in first] != [i for i, _ in _epoch(TrainBatchSampler(50, 5, 10, seed=5), 1)]


def test_epoch_longer_than_the_dataset_takes_more_passes():
    indices = [i for i, _ in _epoch(TrainBatchSampler(10, 4, 6), 1)]  # 24 samples from 10 images
    assert len(indices) == 24 and sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))


def test_resume_inside_an_epoch_continues_the_same_stream():
    sampler = TrainBatchSampler(40, 4, 7, rank=1, world_size=2, seed=9)
    full = _epoch(sampler, 3)
    assert _epoch(sampler, 3, start=4) == full[16:]
    seeds = [seed for _, seed in full]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed


def test_tiny_dataset_for_the_world_size():
    with pytest.raises(UserError, match="fewer than the 4 processes"):
        TrainBatchSampler(3, 1, 1, world_size=4)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        open_image_folder(str(tmp_path / "none"), "--train_dir")
    with pytest.raises(UserError, match="no images found"):
        open_image_folder(str(tmp_path), "--train_dir")
    (tmp_path / "class_a").mkdir()
    (tmp_path / "class_a" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images found"):
        open_image_folder(str(tmp_path), "--val_dir")


def test_a_file_given_as_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    with pytest.raises(UserError, match="--val_dir .*x.png is a file; give the directory"):
        open_image_folder(str(tmp_path / "x.png"), "--val_dir")


def _folder(root, images=2):
    for klass in ("a", "b"):
        (root / klass).mkdir(parents=True)
        for i in range(images):
            cv2.imwrite(str(root / klass / f"{i}.png"), np.full((12, 10, 3), 40 * i, np.uint8))
    return root


@pytest.mark.parametrize("content", [b"", b"\x89PNG truncated garbage", b"\x89PNG\r\n\x1a\n cut off", b"GIF89a" + bytes(10), b"\xff\xd8\xff" + bytes(20)])
def test_unreadable_image_is_found_when_the_folder_is_opened(tmp_path, content, capfd):
    root = _folder(tmp_path / "val")
    (root / "b" / "1.png").write_bytes(content)
    with pytest.raises(CorruptImageError, match=r"cannot (decode|read) image file '.*val/b/1.png'"):
        open_image_folder(str(root), "--val_dir")
    assert capfd.readouterr().err == ""  # no OpenCV log lines next to the one-line error
    assert cv2.utils.logging.getLogLevel() != cv2.utils.logging.LOG_LEVEL_SILENT  # restored
    assert len(open_image_folder(str(root), "--val_dir", check_images=False)) == 4  # found only when read


def test_header_check_accepts_good_images_without_decoding(tmp_path, monkeypatch):
    root = _folder(tmp_path / "val")
    (root / "a" / "0.png").rename(root / "a" / "0.jpg")  # a PNG named .jpg: PIL reads the header anyway
    decoded = []
    monkeypatch.setattr(cls.data, "load_bgr", lambda path: decoded.append(path))
    assert len(open_image_folder(str(root), "--val_dir")) == 4 and decoded == []


def test_header_check_decodes_what_pil_cannot_parse(tmp_path, monkeypatch):
    image = _folder(tmp_path / "val") / "a" / "0.png"
    monkeypatch.setattr(cls.data, "declared_size", lambda path: (None, False))  # e.g. a format PIL lacks
    check_image_file(str(image))  # decoded by OpenCV instead: fine
    image.write_bytes(b"junk")
    with pytest.raises(CorruptImageError, match="cannot decode"):
        check_image_file(str(image))


def test_huge_png_is_reported_as_too_large_not_corrupt(tmp_path):
    huge = tmp_path / "huge.png"
    write_black_png(huge, 40000, 40000)  # valid; 1.6e9 pixels, over OpenCV's default limit of 2^30
    assert huge.stat().st_size < 1_000_000
    for check in (load_bgr, check_image_file):
        with pytest.raises(CorruptImageError, match=r"image file '.*huge.png' is too large to decode \(more than "
                                                    r"\d+ pixels; OpenCV decodes at most 1073741824\): downscale it"):
            check(str(huge))
    root = _folder(tmp_path / "train")
    huge.rename(root / "a" / "9.png")
    with pytest.raises(CorruptImageError, match="9.png' is too large"):
        open_image_folder(str(root), "--train_dir")


def test_small_black_png_writer_is_valid(tmp_path):
    image = tmp_path / "small.png"
    write_black_png(image, 30, 20)
    decoded = load_bgr(str(image))
    assert decoded.shape == (20, 30, 3) and decoded.max() == 0


_LOADER_SCRIPT = r"""
import os, signal, sys, time


def bystander(path):  # a daemonic child that is not a loader worker: ends on SIGTERM, leaving a note
    def note(*_):
        with open(path, "w") as stream:
            stream.write("SIGTERM")
        os._exit(0)

    signal.signal(signal.SIGTERM, note)
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    import multiprocessing, threading
    import torch
    import mabn.utils.data
    from cls.data import (AugmentedImageFolder, TrainBatchSampler, build_train_loader, build_val_loader,
                          open_image_folder)
    from cls.embedded_dataset import ensure_embedded_dataset
    from cls.transforms import TrainTransform, ValTransform

    root = ensure_embedded_dataset(sys.argv[1], 0, 2, 6, 3, 16, log=lambda *_: None)
    other = multiprocessing.get_context("spawn").Process(target=bystander, args=(sys.argv[2],), daemon=True)
    other.start()
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()  # the trainer starts its loaders while other threads run
    train = AugmentedImageFolder(open_image_folder(str(root / "train"), "train"), TrainTransform(16))
    val = AugmentedImageFolder(open_image_folder(str(root / "val"), "val"), ValTransform(16))

    def batches(workers):
        sampler = TrainBatchSampler(len(train), 4, 3, seed=7)
        loader = build_train_loader(train, sampler, workers, torch.device("cpu"))
        out = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            out += [b for b in loader]
        val_loader = build_val_loader(val, 4, 0, 1, workers, torch.device("cpu"))
        out += [b for b in val_loader]
        if workers:  # the shared start method and SIGTERM policy (tests/mabn/utils/test_utils_data.py)
            for built in (loader, val_loader):
                assert built.multiprocessing_context.get_start_method() == "forkserver"
                assert built.worker_init_fn.func is mabn.utils.data._worker_init
            assert loader.persistent_workers and not val_loader.persistent_workers
        return out

    plain = batches(0)
    parallel = batches(2)
    assert len(plain) == len(parallel) == 6 + 2
    for (x0, y0), (x1, y1) in zip(plain, parallel):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    stop.set()
    print("same batches with 0 and 2 workers; forkserver")
    # Exiting ends the persistent workers, and only the way multiprocessing ends daemonic children.
"""


def test_loader_workers_come_from_a_forkserver_and_give_the_same_data(tmp_path):
    """In a subprocess (it starts DataLoader workers): 0 and 2 workers give identical batches through
    the shared worker policy (mabn.utils.data.worker_options; its SIGTERM behaviour is tested there),
    the process exits with its persistent workers open, and cls.data leaves other daemonic children
    alone (no exit handler of its own: the bystander gets multiprocessing's SIGTERM, not a SIGKILL)."""
    from cls_helpers import describe, run_python

    script = tmp_path / "loaders.py"
    script.write_text(_LOADER_SCRIPT)
    note = tmp_path / "bystander.txt"
    result = run_python([str(script), str(tmp_path / "cache"), str(note)], timeout=280)
    assert result.returncode == 0 and "same batches with 0 and 2 workers; forkserver" in result.stdout, \
        describe(result)
    assert note.read_text() == "SIGTERM"
