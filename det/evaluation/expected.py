"""``TEST.EXPECTED_RESULTS``: maskrcnn-benchmark's sanity check of the final metrics.

Each entry is ``[task, metric, [mean, std]]`` (``task`` an IoU type, ``bbox`` or ``segm``;
``metric`` one of AP, AP50, AP75, APs, APm, APl; values as fractions, as the metrics are). After
the final evaluation every entry is checked on every test dataset: the value must lie in the open
range ``mean +- TEST.EXPECTED_RESULTS_SIGMA_TOL x std``. maskrcnn-benchmark logs a FAIL line and
carries on; here a failed check also ends the run with :data:`EXIT_EXPECTED_RESULTS` and one error
line (:class:`ExpectedResultsError`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Sequence, Tuple

from det.evaluation.coco_eval import METRICS
from mabn.utils.errors import UserError

__all__ = ["EXIT_EXPECTED_RESULTS", "ExpectedResult", "ExpectedResultsError", "check_expected_results",
           "parse_expected_results"]

EXIT_EXPECTED_RESULTS = 4
"""Exit status of a run whose final metrics miss ``TEST.EXPECTED_RESULTS``."""

KEY = "TEST.EXPECTED_RESULTS"


class ExpectedResultsError(Exception):
    """The final metrics are outside the range ``TEST.EXPECTED_RESULTS`` allows."""


@dataclass(frozen=True)
class ExpectedResult:
    task: str
    metric: str
    mean: float
    std: float

    def range(self, sigma_tol: float) -> Tuple[float, float]:
        return self.mean - sigma_tol * self.std, self.mean + sigma_tol * self.std


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_expected_results(entries: Sequence[Any], iou_types: Sequence[str], sigma_tol: float) -> List[ExpectedResult]:
    """The entries of ``TEST.EXPECTED_RESULTS``, checked against the tasks this model evaluates
    (``iou_types``); a malformed entry is a one-line :class:`UserError`."""
    if sigma_tol < 0:
        raise UserError(f"TEST.EXPECTED_RESULTS_SIGMA_TOL {sigma_tol} must be >= 0")
    parsed = []
    for entry in entries:
        shape_ok = (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[2], (list, tuple))
                    and len(entry[2]) == 2 and all(_number(v) for v in entry[2]))
        if not shape_ok:
            raise UserError(f"{KEY} entry {entry!r}: write [task, metric, [mean, std]], e.g. "
                            f"['bbox', 'AP', [0.365, 0.002]]")
        task, metric, (mean, std) = entry
        if task not in iou_types:
            raise UserError(f"{KEY} entry {entry!r}: task {task!r} is not evaluated by this model; "
                            f"choose from {', '.join(iou_types)}")
        if metric not in METRICS:
            raise UserError(f"{KEY} entry {entry!r}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        if std < 0:
            raise UserError(f"{KEY} entry {entry!r}: the std must be >= 0")
        parsed.append(ExpectedResult(task, metric, float(mean), float(std)))
    return parsed


def check_expected_results(metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
                           expected: Sequence[ExpectedResult], sigma_tol: float) -> Tuple[List[str], List[str]]:
    """(one PASS/FAIL line per dataset and entry, as maskrcnn-benchmark logs them; the failures
    as short phrases). ``metrics``: dataset -> task -> metric -> value."""
    lines, failures = [], []
    for dataset, tasks in metrics.items():
        for item in expected:
            value = tasks[item.task][item.metric]
            low, high = item.range(sigma_tol)
            passed = low < value < high
            lines.append(f"{'PASS' if passed else 'FAIL'}: {dataset} {item.task} > {item.metric} sanity check "
                         f"(actual vs. expected): {value:.4f} vs. mean={item.mean:.4f}, std={item.std:.4f}, "
                         f"range=({low:.4f}, {high:.4f})")
            if not passed:
                failures.append(f"{dataset} {item.task} {item.metric} {value:.4f} outside ({low:.4f}, {high:.4f})")
    return lines, failures
