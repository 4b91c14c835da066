"""COCO evaluation of the detector's predictions (bbox and segm) and the expected-results check."""
from det.evaluation.coco_eval import (IOU_TYPES, METRICS, coco_results, evaluate_coco, evaluate_dataset, format_table,
                                      gather_results, merge_results)
from det.evaluation.expected import (EXIT_EXPECTED_RESULTS, ExpectedResult, ExpectedResultsError,
                                     check_expected_results, parse_expected_results)

__all__ = ["EXIT_EXPECTED_RESULTS", "ExpectedResult", "ExpectedResultsError", "IOU_TYPES", "METRICS",
           "check_expected_results", "coco_results", "evaluate_coco", "evaluate_dataset", "format_table",
           "gather_results", "merge_results", "parse_expected_results"]
