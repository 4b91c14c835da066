"""det.engine.inference: COCO evaluation of a tiny MABN detector leaves its moving-average buffers
and train/eval modes bit for bit as they were; evaluation during training writes metrics.json."""
from __future__ import annotations

import json

import pytest
import torch

from det_helpers import images_and_targets, tiny_config
from det.data import build_test_loaders
from det.data.build import TestLoaderOptions
from det.data.shapes import ensure_shapes_dataset
from det.engine import launch
from det.engine.inference import inference
from det.engine.trainer import precision_from_dtype
from det.modeling import build_detection_model
from mabn.utils.distributed import DistEnv
from mabn.utils.run_log import RunLog


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=1, categories=3, train_images=8,
                                 val_images=4, image_size=64, log=lambda *_: None)


def test_evaluating_a_mabn_model_leaves_its_buffers_and_modes_unchanged(shapes, tmp_path):
    model = build_detection_model(tiny_config("mabn")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    for seed in range(2):  # fill MABN's windows with something other than their initial values
        images, targets = images_and_targets(seed=seed)
        sum(model(images, targets).values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.backbone.body.layer1.eval()  # a mixed state must come back as it was, too
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modes = {name: module.training for name, module in model.named_modules()}
    assert any(name.endswith("running_var") for name in before)

    catalog = {"tiny_val": {"img_dir": "val", "ann_file": "annotations/instances_val.json"}}
    loaders = build_test_loaders(TestLoaderOptions(["tiny_val"], str(shapes.root), 2, 1, 0, 0), catalog=catalog,
                                 log=lambda *_: None)
    with RunLog(str(tmp_path), True, file_prefix=None, tensorboard_dir=None, progress=False) as log:
        precision = precision_from_dtype("float32", torch.device("cpu"))
        metrics = inference(model, loaders, DistEnv(), str(tmp_path), precision, log)

    assert set(metrics["tiny_val"]) == {"bbox", "segm"}
    assert (tmp_path / "inference" / "tiny_val" / "coco_results.json").is_file()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_evaluation_during_training_writes_metrics_json(shapes, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "coco" / "annotations").mkdir(parents=True)
    for split, name in (("train", "train2017"), ("val", "val2017")):
        (root / "coco" / name).symlink_to(shapes.img_dir(split))
        (root / "coco" / "annotations" / f"instances_{name}.json").symlink_to(shapes.ann_file(split))
    out = tmp_path / "out"
    status = launch.train_net_main([
        "--config-file", "configs/det/shapes/mask_rcnn_mabn_tiny.yaml", "--skip-test",
        "DATASETS.ROOT", str(root), "DATASETS.TRAIN", '("coco_2017_train",)', "DATASETS.TEST", '("coco_2017_val",)',
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.PRE_NMS_TOP_N_TEST", "100",
        "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST", "50", "SOLVER.MAX_ITER", "2", "SOLVER.TEST_PERIOD", "1",
        "OUTPUT_DIR", str(out)])
    assert status == 0, capsys.readouterr().err
    entries = json.loads((out / "metrics.json").read_text())
    assert [entry["iteration"] for entry in entries] == [1]  # the last iteration: --skip-test
    assert set(entries[0]["coco_2017_val"]) == {"bbox", "segm"}
    assert any((out / "tensorboard").iterdir())
