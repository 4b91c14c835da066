"""COCO evaluation of the detector's predictions (bbox and segm)."""
from det.evaluation.coco_eval import (IOU_TYPES, METRICS, coco_results, evaluate_coco, evaluate_dataset, format_table,
                                      gather_results, merge_results)

__all__ = ["IOU_TYPES", "METRICS", "coco_results", "evaluate_coco", "evaluate_dataset", "format_table",
           "gather_results", "merge_results"]
