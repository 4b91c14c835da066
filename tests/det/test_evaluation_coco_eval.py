"""det.evaluation.coco_eval: honest scores (ground truth scores 1, nothing scores 0), the output
files, the conversion of model outputs, merging the ranks' results (the collective itself runs in
the engine's multi-process tests)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from det.data.coco import COCODataset
from det.data.shapes import ensure_shapes_dataset
from det.evaluation.coco_eval import METRICS, coco_results, evaluate_dataset, gather_results, merge_results


def _quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> COCODataset:
    shapes = ensure_shapes_dataset(tmp_path_factory.mktemp("shapes"), seed=2, categories=4, train_images=1,
                                   val_images=12, image_size=64, log=_quiet)
    return COCODataset("tiny_val", str(shapes.img_dir("val")), str(shapes.ann_file("val")),
                       remove_images_without_annotations=False)


def _ground_truth_as_predictions(dataset: COCODataset) -> dict:
    """Model-style outputs (xyxy boxes, contiguous labels, (N, 1, H, W) mask probabilities) of the targets."""
    predictions = {}
    for index in range(len(dataset)):
        _, target = dataset.raw_item(index)
        masks = torch.from_numpy(target["masks"]).float()[:, None] * 0.9 + 0.05  # probabilities around 0.5
        predictions[index] = {"boxes": torch.from_numpy(target["boxes"]), "labels": torch.from_numpy(target["labels"]),
                              "scores": torch.linspace(0.9, 0.6, len(target["labels"])), "masks": masks}
    return predictions


def test_ground_truth_scores_one(dataset, tmp_path):
    messages = []
    metrics = evaluate_dataset(dataset, coco_results(dataset, _ground_truth_as_predictions(dataset)), str(tmp_path),
                               log=messages.append)
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRICS)
        for name in ("AP", "AP50", "AP75"):
            assert metrics[iou_type][name] == pytest.approx(1.0)
        assert all(metrics[iou_type][name] in (pytest.approx(1.0), -1.0) for name in ("APs", "APm", "APl"))
    assert "tiny_val" in messages[0] and "bbox" in messages[0] and "segm" in messages[0] and "1.0000" in messages[0]


def test_nothing_scores_zero_and_writes_the_files(dataset, tmp_path):
    for predictions in ({}, {i: {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                 "scores": torch.zeros(0), "masks": torch.zeros(0, 1, *dataset.image_size(i))}
                             for i in range(len(dataset))}):
        metrics = evaluate_dataset(dataset, gather_results(coco_results(dataset, predictions)), str(tmp_path),
                                   log=_quiet)
        assert all(metrics[t][name] <= 0.0 for t in ("bbox", "segm") for name in METRICS)
        assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == 0.0
    folder = tmp_path / "inference" / "tiny_val"
    assert sorted(os.listdir(folder)) == ["bbox.json", "coco_results.json", "segm.json"]
    assert json.loads((folder / "bbox.json").read_text()) == []
    assert json.loads((folder / "coco_results.json").read_text()) == metrics


def test_wrong_predictions_score_less(dataset, tmp_path):
    truth = _ground_truth_as_predictions(dataset)
    shifted = {i: {**p, "boxes": p["boxes"] + 6.0, "masks": p["masks"].roll(6, dims=-1)} for i, p in truth.items()}
    relabelled = {i: {**p, "labels": p["labels"] % 4 + 1} for i, p in truth.items()}
    for predictions, ceiling in ((shifted, 0.6), (relabelled, 0.01)):
        metrics = evaluate_dataset(dataset, coco_results(dataset, predictions), str(tmp_path), log=_quiet)
        assert metrics["bbox"]["AP"] < ceiling and metrics["segm"]["AP"] < ceiling


def test_results_are_coco_format(dataset, tmp_path):
    predictions = _ground_truth_as_predictions(dataset)
    results = coco_results(dataset, {0: predictions[0]})
    first_box = predictions[0]["boxes"][0].tolist()
    entry = results["bbox"][0]
    assert entry["image_id"] == dataset.image_id(0)
    assert entry["category_id"] == dataset.contiguous_to_category[int(predictions[0]["labels"][0])]
    assert entry["bbox"] == pytest.approx([first_box[0], first_box[1], first_box[2] - first_box[0],
                                           first_box[3] - first_box[1]])
    assert isinstance(results["segm"][0]["segmentation"]["counts"], str)
    json.dumps(results)
    without_masks = {0: {k: v for k, v in predictions[0].items() if k != "masks"}}
    assert set(coco_results(dataset, without_masks)) == {"bbox"}
    metrics = evaluate_dataset(dataset, coco_results(dataset, without_masks), str(tmp_path), ("bbox",), log=_quiet)
    assert set(metrics) == {"bbox"} and not (tmp_path / "inference" / "tiny_val" / "segm.json").exists()


def test_masks_not_at_image_resolution_are_refused(dataset):
    prediction = _ground_truth_as_predictions(dataset)[0]
    prediction["masks"] = prediction["masks"][..., :-1]
    with pytest.raises(ValueError, match="not pasted at the image resolution"):
        coco_results(dataset, {0: prediction})


def test_merge_and_gather():
    parts = [{"bbox": [{"image_id": 2, "score": 0.5}], "segm": [{"image_id": 5}]},
             {"bbox": [{"image_id": 1, "score": 0.5}, {"image_id": 3, "score": 0.1}], "segm": []}]
    assert merge_results(parts) == {"bbox": [{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.5},
                                             {"image_id": 3, "score": 0.1}], "segm": [{"image_id": 5}]}
    assert gather_results(parts[0]) is parts[0]  # no process group: unchanged
