"""cls.embedded_dataset: deterministic images, atomic one-time writing, ImageFolder layout."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import pytest

from cls.data import open_image_folder
from cls.config import DIFFICULTY_NAMES
from cls.embedded_dataset import CLASS_NAMES, DIFFICULTIES, dataset_name, ensure_embedded_dataset, render_image


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_at_least_ten_classes_with_distinct_names():
    assert len(CLASS_NAMES) >= 10 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert list(CLASS_NAMES) == sorted(CLASS_NAMES)  # ImageFolder's label order is the class order


def test_render_is_a_function_of_its_arguments():
    a = render_image(0, "train", 3, 7, 40)
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_image(0, "train", 3, 7, 40))
    assert not np.array_equal(a, render_image(1, "train", 3, 7, 40))
    assert not np.array_equal(a, render_image(0, "val", 3, 7, 40))
    assert not np.array_equal(a, render_image(0, "train", 3, 8, 40))


def test_difficulty_changes_the_images_and_the_cache_name():
    hard = render_image(0, "train", 3, 7, 28)
    easy = render_image(0, "train", 3, 7, 28, "easy")
    assert np.array_equal(hard, render_image(0, "train", 3, 7, 28, "hard"))
    assert np.array_equal(easy, render_image(0, "train", 3, 7, 28, "easy")) and not np.array_equal(hard, easy)
    # hard keeps the name its caches were written under; other levels add theirs.
    assert dataset_name(0, 16, 600, 100, 40) == dataset_name(0, 16, 600, 100, 40, "hard") == \
        "embedded-shapes-v2-seed0-c16-train600-val100-px40"
    assert dataset_name(0, 16, 600, 100, 28, "easy") == "embedded-shapes-v2-seed0-c16-train600-val100-px28-easy"
    assert tuple(DIFFICULTIES) == DIFFICULTY_NAMES  # the trainer's --synthetic_difficulty choices
    with pytest.raises(ValueError, match="hard, easy"):
        render_image(0, "train", 3, 7, 28, "medium")


def test_easy_level_has_no_clutter():
    easy = DIFFICULTIES["easy"]
    assert easy.lines == (0, 0) and easy.distractors == (0, 0)
    assert easy.object_rotation[1] - easy.object_rotation[0] < DIFFICULTIES["hard"].object_rotation[1]


def test_written_dataset_is_deterministic(tmp_path):
    first = ensure_embedded_dataset(tmp_path / "a", seed=5, classes=10, train_per_class=3, val_per_class=2, size=24,
                                    log=lambda *_: None)
    second = ensure_embedded_dataset(tmp_path / "b", seed=5, classes=10, train_per_class=3, val_per_class=2, size=24,
                                     log=lambda *_: None)
    other = ensure_embedded_dataset(tmp_path / "c", seed=6, classes=10, train_per_class=3, val_per_class=2, size=24,
                                    log=lambda *_: None)
    assert first.name == dataset_name(5, 10, 3, 2, 24)
    assert _digest(first) == _digest(second) != _digest(other)
    train = open_image_folder(str(first / "train"), "train")
    assert len(train) == 30 and train.classes == list(CLASS_NAMES[:10])
    assert len(open_image_folder(str(first / "val"), "val")) == 20
    # Nothing left over next to the dataset but the lock file.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [first.name, first.name + ".lock"]


def test_existing_dataset_is_not_rewritten(tmp_path):
    root = ensure_embedded_dataset(tmp_path, 0, 10, 1, 1, 16, log=lambda *_: None)
    stamp = (root / "meta.json").stat().st_mtime_ns
    messages = []
    assert ensure_embedded_dataset(tmp_path, 0, 10, 1, 1, 16, log=messages.append) == root
    assert messages == [] and (root / "meta.json").stat().st_mtime_ns == stamp


def test_partial_directory_without_marker_is_replaced(tmp_path):
    target = tmp_path / dataset_name(0, 10, 1, 1, 16)
    (target / "train").mkdir(parents=True)  # e.g. a copy interrupted by hand
    root = ensure_embedded_dataset(tmp_path, 0, 10, 1, 1, 16, log=lambda *_: None)
    assert (root / "meta.json").is_file() and len(list(root.rglob("*.png"))) == 20


def _writer(cache: str, queue) -> None:
    root = ensure_embedded_dataset(cache, 1, 10, 6, 2, 24, log=lambda *_: queue.put("wrote"))
    queue.put(_digest(root))


def test_concurrent_writers_produce_one_dataset(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_writer, args=(str(tmp_path), queue)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    results = [queue.get(timeout=5) for _ in range(4)]
    assert results.count("wrote") == 1
    assert len({r for r in results if r != "wrote"}) == 1


def test_bad_class_count_and_difficulty(tmp_path):
    with pytest.raises(ValueError):
        ensure_embedded_dataset(tmp_path, classes=len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="difficulty"):
        ensure_embedded_dataset(tmp_path, difficulty="medium")
    assert list(tmp_path.iterdir()) == []


def test_easy_dataset_records_its_difficulty(tmp_path):
    root = ensure_embedded_dataset(tmp_path, 0, 2, 1, 1, 16, log=lambda *_: None, difficulty="easy")
    assert root.name == dataset_name(0, 2, 1, 1, 16, "easy")
    assert json.loads((root / "meta.json").read_text())["difficulty"] == "easy"
    assert np.array_equal(cv2.imread(str(root / "val" / CLASS_NAMES[1] / "00000.png")),
                          render_image(0, "val", 1, 0, 16, "easy"))
