"""TEST.EXPECTED_RESULTS: entries as maskrcnn-benchmark writes them, the open range
mean +- sigma_tol x std, PASS/FAIL lines per dataset, one-line errors for malformed entries."""
from __future__ import annotations

import pytest

from det.evaluation import ExpectedResult, check_expected_results, parse_expected_results
from mabn.utils.errors import UserError

METRICS = {"coco_2014_minival": {"bbox": {"AP": 0.365, "AP50": 0.558}, "segm": {"AP": 0.327}}}


def test_entries_parse_as_published():
    entries = [["bbox", "AP", [0.365, 0.002]], ("segm", "AP75", (0.35, 0))]
    parsed = parse_expected_results(entries, ("bbox", "segm"), 4.0)
    assert parsed == [ExpectedResult("bbox", "AP", 0.365, 0.002), ExpectedResult("segm", "AP75", 0.35, 0.0)]
    assert parse_expected_results([], ("bbox",), 4.0) == []


@pytest.mark.parametrize("entry, message", [
    (["bbox", "AP", 0.365, 0.002], r"write \[task, metric, \[mean, std\]\]"),
    (["bbox", "AP", [0.365]], r"write \[task, metric, \[mean, std\]\]"),
    (["bbox", "AP", ["high", 0.1]], r"write \[task, metric, \[mean, std\]\]"),
    (["segm", "AP", [0.3, 0.01]], "task 'segm' is not evaluated by this model; choose from bbox"),
    (["bbox", "mAP", [0.3, 0.01]], "unknown metric 'mAP'; choose from AP, AP50"),
    (["bbox", "AP", [0.3, -0.01]], "the std must be >= 0"),
])
def test_malformed_entries_are_one_line_errors(entry, message):
    with pytest.raises(UserError, match=message) as info:
        parse_expected_results([entry], ("bbox",), 4.0)
    assert "\n" not in str(info.value) and str(info.value).startswith("TEST.EXPECTED_RESULTS entry ")


def test_negative_sigma_tol_is_refused():
    with pytest.raises(UserError, match="TEST.EXPECTED_RESULTS_SIGMA_TOL -1 must be >= 0"):
        parse_expected_results([], ("bbox",), -1)


def test_open_range_of_sigma_tol_standard_deviations():
    inside = [ExpectedResult("bbox", "AP", 0.36, 0.002)]  # (0.352, 0.368) with sigma_tol 4
    lines, failures = check_expected_results(METRICS, inside, 4.0)
    assert failures == [] and len(lines) == 1
    assert lines[0].startswith("PASS: coco_2014_minival bbox > AP sanity check (actual vs. expected): 0.3650 vs. "
                               "mean=0.3600, std=0.0020, range=(0.3520, 0.3680)")
    lines, failures = check_expected_results(METRICS, inside, 2.0)  # (0.356, 0.364)
    assert lines[0].startswith("FAIL: ") and failures == ["coco_2014_minival bbox AP 0.3650 outside (0.3560, 0.3640)"]
    exact = [ExpectedResult("segm", "AP", 0.327, 0.0)]  # an empty open range: nothing passes
    failures = check_expected_results(METRICS, exact, 4.0)[1]
    assert failures == ["coco_2014_minival segm AP 0.3270 outside (0.3270, 0.3270)"]


def test_every_dataset_is_checked():
    metrics = {"a": {"bbox": {"AP": 0.5}}, "b": {"bbox": {"AP": 0.1}}}
    lines, failures = check_expected_results(metrics, [ExpectedResult("bbox", "AP", 0.5, 0.01)], 3.0)
    assert [line[:6] for line in lines] == ["PASS: ", "FAIL: "]
    assert failures == ["b bbox AP 0.1000 outside (0.4700, 0.5300)"]
