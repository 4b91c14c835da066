"""det.engine.predictor, det.engine.visualize and the demo script."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from det_helpers import FAST, REPO, tiny_config

from det.demo import predict as demo
from det.engine.predictor import Predictor, resolve_device
from det.engine.visualize import COCO_CLASS_NAMES, class_names_for, draw_detections
from det.modeling import build_detection_model
from mabn.utils.errors import UserError

SCORE_OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH", "0.0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A detection checkpoint of the tiny MABN model (random weights)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_detection_model(tiny_config("mabn"))
    path = tmp_path_factory.mktemp("det_ckpt") / "model_final.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "iteration": 0}, path)
    return str(path)


def _image(height: int = 72, width: int = 100) -> np.ndarray:
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    image[10:50, 20:70] = (30, 200, 90)
    return image


def test_predict_returns_numpy_in_image_coordinates(checkpoint):
    predictor = Predictor(tiny_config("mabn", *SCORE_OPTS), checkpoint)
    assert not predictor.model.training and not predictor.report.missing
    result = predictor.predict(_image())
    count = len(result["scores"])
    assert count > 0 and result["boxes"].shape == (count, 4) and result["labels"].shape == (count,)
    assert result["masks"].shape == (count, 72, 100) and result["masks"].dtype == bool
    assert (result["boxes"][:, 2] <= 100).all() and (result["boxes"][:, 3] <= 72).all()
    assert np.all(np.diff(result["scores"]) <= 0)


def test_predict_matches_model_on_rgb_input(checkpoint):
    cfg = tiny_config("mabn", *SCORE_OPTS)
    predictor = Predictor(cfg, checkpoint)
    image = _image()
    rgb = torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        expected = predictor.model([rgb])[0]
    result = predictor.predict(image)
    np.testing.assert_allclose(result["scores"], expected["scores"].numpy(), rtol=1e-5, atol=1e-6)


def test_predictor_errors(checkpoint, tmp_path):
    cfg = tiny_config("mabn")
    with pytest.raises(UserError, match="no weights"):
        Predictor(cfg, None)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3)},
               tmp_path / "backbone_only.pth")
    with pytest.raises(UserError, match="does not hold a whole detector"):
        Predictor(cfg, str(tmp_path / "backbone_only.pth"))
    predictor = Predictor(cfg, checkpoint)
    with pytest.raises(UserError, match="HxWx3 uint8 BGR"):
        predictor.predict(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(UserError, match="MODEL.DEVICE 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_draw_detections_marks_masks_boxes_and_names():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    masks = np.zeros((2, 60, 80), dtype=bool)
    masks[0, 10:30, 10:40] = True
    detections = {"boxes": np.array([[10, 10, 40, 30], [50, 40, 70, 55]], dtype=np.float32),
                  "labels": np.array([1, 3]), "scores": np.array([0.9, 0.2]), "masks": masks}
    drawn = draw_detections(image, detections, class_names_for(81), score_threshold=0.5)
    assert drawn.shape == image.shape and not image.any()  # the input is left alone
    assert drawn[20, 25].any()  # mask blended
    assert not drawn[47, 60].any()  # the low-scoring detection is not drawn
    assert class_names_for(81)[1] == "person" and len(COCO_CLASS_NAMES) == 81 and class_names_for(4)[3] == "class 3"


def test_demo_writes_the_drawn_image(checkpoint, tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "in.png"), _image())
    code = demo.main(["--config-file", "configs/det/shapes/mask_rcnn_mabn_tiny.yaml", "--ckpt", checkpoint,
                      "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out.png"),
                      "--score-threshold", "0", *FAST, *SCORE_OPTS])
    assert code == 0 and "drawn" in capsys.readouterr().out
    assert cv2.imread(str(tmp_path / "out.png")).shape == (72, 100, 3)
    code = demo.main(["--config-file", "configs/det/shapes/mask_rcnn_mabn_tiny.yaml", "--ckpt", checkpoint,
                      "--input", str(tmp_path / "missing.png"), "--output", str(tmp_path / "out2.png")])
    assert code == 2 and "error: --input" in capsys.readouterr().err
    code = demo.main(["--config-file", "configs/det/shapes/mask_rcnn_mabn_tiny.yaml", "--ckpt", checkpoint,
                      "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out2.png"),
                      "MODEL.BACKBONE.CONV_BODY", "R-18-FPN-GN"])
    assert code == 2 and capsys.readouterr().err.startswith("error: the body's norms disagree")
    assert not (tmp_path / "out2.png").exists()


def test_demo_script_runs_from_det_folder_with_published_config_path(checkpoint, tmp_path):
    cv2.imwrite(str(tmp_path / "in.png"), _image())
    result = subprocess.run(
        [sys.executable, "demo/predict.py", "--config-file", "configs/shapes/mask_rcnn_mabn_tiny.yaml",
         "--ckpt", checkpoint, "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out.png")],
        cwd=REPO / "det", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.png").is_file()
