"""Bad input on the command line of ``python -m cls.train``: exit status 2 and one ``error:`` line
on stderr before any training, with nothing written to ``--save`` (the checks themselves are
tested one by one, faster, in test_cls_config.py and test_cls_data.py)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from cls_helpers import describe, run_python
from image_files import write_black_png

TINY_SYNTHETIC = ["--dataset", "synthetic", "--synthetic_classes", "2", "--synthetic_train_per_class", "4",
                  "--synthetic_val_per_class", "2", "--synthetic_image_size", "16"]
TINY_RUN = ["--arch", "resnet20", "--image_size", "16", "--batch_size", "4", "--total_epoch", "1",
            "--iters_per_epoch", "1", "--workers", "0", "--no-progress"]


def _train(tmp_path: Path, argv, dataset=TINY_SYNTHETIC):
    command = ["-m", "cls.train", *dataset, *TINY_RUN, "--data_cache", str(tmp_path / "cache"), *argv]
    if "--save" not in argv:
        command += ["--save", str(tmp_path / "save")]
    return run_python(command, timeout=280)


def _image_folder(root: Path, side: int = 12) -> Path:
    for klass in ("a", "b"):
        (root / klass).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(root / klass / f"{i}.png"), np.full((side, side, 3), 30 * i + 20, np.uint8))
    return root


def _assert_one_error(result, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, describe(result)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], describe(result)


def _config(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    return path


CASES = {
    "image size 1": (lambda tmp: ["--image_size", "1"], "--image_size 1 is too small for resnet20"),
    "nan learning rate": (lambda tmp: ["--learning_rate=nan"], "--learning_rate: expected a finite number, got nan"),
    "inf weight decay": (lambda tmp: ["--weight_decay=inf"], "--weight_decay: expected a finite number, got inf"),
    "binary config": (lambda tmp: ["--config", str(_config(tmp, bytes(range(256))))], "not a text file"),
    "duplicate yaml key": (lambda tmp: ["--config", str(_config(tmp, b"norm: bn\nnorm: gn\n"))],
                           "key 'norm' appears twice (lines 1 and 2)"),
    "export into a directory": (lambda tmp: ["--export_folded", str(tmp)], "is a directory; give a file path"),
    "export below a missing directory": (lambda tmp: ["--export_folded", str(tmp / "no" / "f.pth")],
                                         "does not exist; create it first"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flags_stop_before_anything_is_written(tmp_path, case):
    make_argv, fragment = CASES[case]
    result = _train(tmp_path, make_argv(tmp_path))
    _assert_one_error(result, fragment)
    assert not (tmp_path / "save").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag", ["--save", "--data_cache"])
def test_output_folder_that_is_a_file(tmp_path, flag):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    result = _train(tmp_path, [flag, str(a_file)])
    _assert_one_error(result, f"{flag} {a_file} is a file, not a directory")
    assert a_file.read_text() == "keep me" and not (tmp_path / "save").exists()


@pytest.mark.parametrize("bad, fragment", [
    ("corrupt", "cannot decode image file '{val}/b/3.png' (corrupt or not an image)"),
    ("huge", "image file '{val}/b/3.png' is too large to decode"),
])
def test_unreadable_validation_image_is_found_before_training(tmp_path, bad, fragment):
    train, val = _image_folder(tmp_path / "train"), _image_folder(tmp_path / "val")
    if bad == "corrupt":
        (val / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    else:
        write_black_png(val / "b" / "3.png", 40000, 40000)
    result = _train(tmp_path, [], dataset=["--train_dir", str(train), "--val_dir", str(val)])
    _assert_one_error(result, fragment.format(val=val))
    assert "TRAIN" not in result.stdout and not (tmp_path / "save").exists()


def test_one_pixel_training_images_train_and_ignored_flags_warn(tmp_path):
    train, val = _image_folder(tmp_path / "train", side=1), _image_folder(tmp_path / "val", side=1)
    result = _train(tmp_path, ["--norm", "gn", "--norm_batch", "2"],
                    dataset=["--train_dir", str(train), "--val_dir", str(val)])
    assert result.returncode == 0, describe(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == ["warning: --norm gn ignores --norm_batch (bn, brn, mabn, syncbn): each applies only to "
                        "the norms named"], describe(result)
    assert "TRAIN Epoch 1" in result.stdout and (tmp_path / "save" / "checkpoint.pth").is_file()
