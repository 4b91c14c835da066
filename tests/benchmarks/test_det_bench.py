"""The detector benchmark: synthetic targets in torchvision's format, bad input, and one tiny CLI run
(BN, GN, MABN and the 2-process SyncBN) that writes well-formed JSON. No assertion reads a timing."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import det_bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_synthetic_batch_matches_torchvision_targets():
    images, targets = det_bench.synthetic_batch(64, 80, num_classes=4, seed=3)
    assert len(images) == len(targets) == det_bench.IMAGES
    for image, target in zip(images, targets):
        assert image.shape == (3, 64, 80) and 0 <= image.min() and image.max() <= 1
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and masks.dtype == torch.uint8
        assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and bool((boxes[:, 2] <= 80).all())
        assert bool((boxes[:, 3] <= 64).all()) and bool(((labels >= 1) & (labels < 4)).all())
        assert masks.shape == (len(boxes), 64, 80) and bool((masks.flatten(1).sum(1) > 0).all())
    again, _ = det_bench.synthetic_batch(64, 80, num_classes=4, seed=3)
    assert torch.equal(images[0], again[0])


def test_fixed_proposals_depend_only_on_the_inputs_and_hold_positives():
    from torchvision.ops import box_iou

    _, targets = det_bench.synthetic_batch(64, 80, num_classes=4, seed=3)
    sizes = [(64, 80)] * len(targets)
    proposals = det_bench.fixed_proposals(sizes, targets, per_image=20)
    assert all(torch.equal(a, b) for a, b in zip(proposals, det_bench.fixed_proposals(sizes, targets, per_image=20)))
    for boxes, target in zip(proposals, targets):
        assert boxes.shape == (20, 4) and boxes.dtype == target["boxes"].dtype
        assert bool((boxes >= 0).all()) and bool((boxes[:, 2] <= 80).all()) and bool((boxes[:, 3] <= 64).all())
        best = box_iou(boxes, target["boxes"]).max(dim=1).values
        # the shifted copies of the boxes (half of them, rounded down to whole copies) are positives
        assert int((best >= 0.5).sum()) >= 20 // (2 * len(target["boxes"])) * len(target["boxes"])


def test_every_variant_gets_the_same_proposals_and_as_many_rois():
    """BN and MABN, whose untrained RPNs propose different boxes, give their RoI heads the same
    proposals, so the mask head's batch (the positive RoIs) has the same size."""
    images, targets = det_bench._batch_for(det_bench.TINY, "bn")
    proposals, mask_rois = {}, {}

    def record(norm):
        def before_heads(module, args):
            proposals[norm] = [boxes.clone() for boxes in args[1]]

        def mask_pool(module, args, output):
            mask_rois.setdefault(norm, [len(boxes) for boxes in args[1]])
        return before_heads, mask_pool

    for norm in ("bn", "mabn"):
        case = det_bench.build_step(det_bench.TINY, norm, images, targets)
        model = next(cell.cell_contents for cell in case.run.__closure__
                     if isinstance(cell.cell_contents, torch.nn.Module))
        before_heads, mask_pool = record(norm)
        model.roi_heads.register_forward_pre_hook(before_heads)
        model.roi_heads.mask_roi_pool.register_forward_hook(mask_pool)
        case.prepare()
        case.run()
    assert all(torch.equal(a, b) for a, b in zip(proposals["bn"], proposals["mabn"]))
    assert mask_rois["bn"] == mask_rois["mabn"] and sum(mask_rois["bn"]) > 0


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--warmup", "-1"], ["--threads", "0"],
                                  ["--json", "/no/such/folder/out.json"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as raised:
        det_bench.parse_args(args)
    assert raised.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_tiny_cli_run_writes_well_formed_json(tmp_path):
    path = tmp_path / "det.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.det_bench", "--quick", "--rounds", "1", "--warmup", "0",
                           "--threads", "1", "--json", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(path.read_text())
    assert results["quick"] and results["machine"]["threads"] == 1
    [config] = results["configs"]
    assert config["config"] == det_bench.TINY.name and config["rounds"] == 1
    rows = {row["variant"]: row for row in config["rows"]}
    assert list(rows) == [det_bench.BN, det_bench.GN, det_bench.MABN, det_bench.SYNCBN, det_bench.SYNCBN_NO_COMM]
    for name in (det_bench.BN, det_bench.GN, det_bench.MABN):
        assert rows[name]["loss_finite"]
    for name in (det_bench.BN, det_bench.GN, det_bench.MABN, det_bench.SYNCBN):
        assert rows[name]["saved_mib"] > 0 and rows[name]["peak_rss_mib"] >= 0
    for row in rows.values():
        assert len(row["times_ms"]) == 1 and row["median_ms"] > 0
        assert math.isclose(row["ratio_to_bn"], row["median_ms"] / rows[det_bench.BN]["median_ms"])
    sync = config["syncbn"]
    assert sync["all_reduce_calls_per_step"] > 0 and sync["all_reduce_median_ms"] >= 0
    assert [target["name"] for target in results["targets"]] == [
        "tiny train step MABN / BN", "tiny train step MABN / GN", "tiny saved for backward MABN / BN"]
    assert all(target["passed"] in (True, False) for target in results["targets"])
    assert done.stdout.count("PASS") + done.stdout.count("MISS") == 3
