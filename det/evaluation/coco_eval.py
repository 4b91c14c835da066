"""COCO evaluation (pycocotools' COCOeval) of Mask R-CNN predictions, for bbox and segm.

The three steps, as the engine calls them:

1. every rank: ``local = coco_results(dataset, predictions)`` turns its shard of model outputs
   (dataset index -> torchvision output dict with ``boxes`` xyxy in original image coordinates,
   ``labels`` contiguous, ``scores`` and, with masks, ``masks`` (N, 1, H, W) probabilities pasted
   at the image resolution) into COCO result dicts: boxes as xywh, category ids mapped back,
   masks thresholded at 0.5 and encoded as RLE. These are small, so gathering them is cheap;
2. every rank: ``results = gather_results(local)`` (a collective when a process group exists);
3. rank 0: ``evaluate_dataset(dataset, results, output_dir)`` writes
   ``<output_dir>/inference/<dataset>/{bbox.json, segm.json, coco_results.json}``, logs the table
   and returns ``{"bbox": {"AP": ..., "AP50": ..., ...}, "segm": {...}}``.

Metrics are COCOeval's first six statistics (AP at IoU .50:.95, .50, .75, and AP for small,
medium and large objects), fractions in 0..1, -1 where the ground truth has no object of that
size. Images without predictions count as misses; no predictions at all scores 0.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from det.data.coco import COCODataset
from mabn.utils.checkpoint import write_text_atomic

__all__ = ["IOU_TYPES", "METRICS", "coco_results", "evaluate_coco", "evaluate_dataset", "format_table",
           "gather_results", "merge_results"]

IOU_TYPES = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_THRESHOLD = 0.5

Results = Dict[str, List[dict]]


def coco_results(dataset: COCODataset, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> Results:
    """COCO result dicts per IoU type (``"segm"`` only for outputs with masks); see the module doc."""
    results: Results = {"bbox": [], "segm": []}
    for index in sorted(predictions):
        output = predictions[index]
        image_id = dataset.image_id(index)
        boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        scores = output["scores"].detach().float().cpu().tolist()
        categories = [dataset.contiguous_to_category[int(label)] for label in output["labels"].tolist()]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        results["bbox"].extend({"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                               for c, b, s in zip(categories, xywh, scores))
        if "masks" not in output:
            continue
        masks = output["masks"].detach().cpu()
        masks = masks[:, 0] if masks.dim() == 4 else masks
        height, width = dataset.image_size(index)
        if masks.shape[1:] != (height, width):
            raise ValueError(f"masks of image {image_id} are {tuple(masks.shape[1:])}, not pasted at the image "
                             f"resolution ({height}, {width})")
        binary = np.asfortranarray((masks > MASK_THRESHOLD).numpy().astype(np.uint8).transpose(1, 2, 0))
        for rle, c, s in zip(mask_utils.encode(binary), categories, scores):
            rle["counts"] = rle["counts"].decode("ascii")
            results["segm"].append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    if not any("masks" in output for output in predictions.values()):
        del results["segm"]
    return results


def merge_results(parts: Sequence[Results]) -> Results:
    """The results of several ranks as one, in image order (so that the order of equal scores,
    which COCOeval keeps, does not depend on the number of processes)."""
    merged: Results = {}
    for part in parts:
        for iou_type, entries in part.items():
            merged.setdefault(iou_type, []).extend(entries)
    return {iou_type: sorted(entries, key=lambda r: r["image_id"]) for iou_type, entries in merged.items()}


def gather_results(local: Results) -> Results:
    """Every rank's results on every rank (a collective: all ranks call it), merged; ``local``
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered: List[Results] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return merge_results(gathered)


def _load_results(coco_gt: COCO, entries: List[dict]) -> COCO:
    """pycocotools' result index (``loadRes`` fails on an empty list: then an empty index)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if entries:
            return coco_gt.loadRes([dict(entry) for entry in entries])
        empty = COCO()
        empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                         "annotations": []}
        empty.createIndex()
        return empty


def evaluate_coco(coco_gt: COCO, results: Results, iou_types: Sequence[str] = IOU_TYPES) -> Dict[str, Dict[str, float]]:
    """COCOeval's six metrics per IoU type, over every image of ``coco_gt``."""
    metrics = {}
    for iou_type in iou_types:
        evaluator = COCOeval(coco_gt, _load_results(coco_gt, results.get(iou_type, [])), iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {name: float(value) for name, value in zip(METRICS, evaluator.stats[:len(METRICS)])}
    return metrics


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The metrics as a fixed-width text table, one row per IoU type."""
    lines = ["task  " + "".join(f"{name:>8}" for name in METRICS)]
    for iou_type, values in metrics.items():
        lines.append(f"{iou_type:<6}" + "".join(f"{values[name]:8.4f}" for name in METRICS))
    return "\n".join(lines)


def evaluate_dataset(dataset: COCODataset, results: Results, output_dir: str, iou_types: Sequence[str] = IOU_TYPES,
                     log: Callable[[str], None] = print) -> Dict[str, Dict[str, float]]:
    """Evaluate gathered ``results`` on ``dataset``, write ``<output_dir>/inference/<name>/`` (the
    results per IoU type and ``coco_results.json``), log the table and return the metrics."""
    folder = os.path.join(output_dir, "inference", dataset.name)
    os.makedirs(folder, exist_ok=True)
    for iou_type in iou_types:
        write_text_atomic(os.path.join(folder, f"{iou_type}.json"), json.dumps(results.get(iou_type, [])))
    metrics = evaluate_coco(dataset.coco(), results, iou_types)
    write_text_atomic(os.path.join(folder, "coco_results.json"), json.dumps(metrics))
    log(f"COCO evaluation of {dataset.name} ({len(dataset)} images):\n{format_table(metrics)}")
    return metrics
