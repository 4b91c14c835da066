"""Pieces of the reproduction: schedule scaling, the commands it runs, reading cls's metrics.json, claims, the
task runner."""
from __future__ import annotations

import json
import os
import sys

import pytest

from reproduction.claims import ONE_SEED, check_claims, compare, speed_comparison
from mabn.utils.errors import UserError
from reproduction.classification import (CLS_ITERS_FULL, CLS_ITERS_QUICK, EPOCHS, FIXED_SECONDS, SECONDS_PER_ITER,
                                          TABLE_ROWS, Row, cls_command, cls_schedule_flags, estimated_seconds,
                                          read_final_metrics, sweep_rows)
from reproduction.detection import tiny_schedule
from reproduction.runner import Task, run_tasks, single_thread_env
from reproduction.schedules import BRN_SCHEDULE, MABN_CLS_SCHEDULE, MABN_DET_SCHEDULE, scale_schedule


def test_schedules_keep_the_published_fraction_of_the_run():
    assert BRN_SCHEDULE.fractions() == {"warmup": 5000 / 160000, "r_ramp_end": 0.25, "d_ramp_end": 25000 / 160000}
    assert scale_schedule(BRN_SCHEDULE, 1000) == {"warmup": 31, "r_ramp_end": 250, "d_ramp_end": 156}
    assert scale_schedule(BRN_SCHEDULE, 160_000) == dict(BRN_SCHEDULE.iterations)
    assert scale_schedule(MABN_CLS_SCHEDULE, 600_000) == {"warmup": 100, "r_warmup": 1000}
    assert scale_schedule(MABN_CLS_SCHEDULE, 1000) == {"warmup": 1, "r_warmup": 2}  # at least 1
    assert scale_schedule(MABN_DET_SCHEDULE, 1800) == {"warmup": 1, "r_warmup": 10}
    with pytest.raises(ValueError, match="positive"):
        scale_schedule(BRN_SCHEDULE, 0)


@pytest.mark.parametrize("row", TABLE_ROWS, ids=lambda r: r.key)
def test_cls_commands_parse_with_the_trainer_flags(row: Row, tmp_path):
    from cls.config import parse_args

    command = cls_command(row, 1000, 3, str(tmp_path / "run"), ["--synthetic_val_per_class", "5"])
    assert command[:3] == [sys.executable, "-m", "cls.train"]
    args = parse_args(command[3:])
    assert (args.arch, args.image_size, args.batch_size, args.seed, args.workers) == ("resnet8", 24, 32, 3, 0)
    assert args.iters_per_epoch * args.total_epoch == 1000 and args.lr_milestones == [7, 9]
    assert args.learning_rate == 0.2 and args.norm == row.norm and args.norm_batch == row.norm_batch
    # The regime's embedded data; the caller's data flags come last and win.
    assert (args.synthetic_difficulty, args.synthetic_image_size, args.synthetic_classes,
            args.synthetic_train_per_class, args.synthetic_val_per_class) == ("easy", 28, 16, 600, 5)
    if row.norm == "brn":
        assert (args.brn_warmup, args.brn_r_ramp_end, args.brn_d_ramp_end) == (31, 250, 156)
    if row.norm == "mabn":
        assert (args.warmup_iters, args.mabn_r_warmup, args.ma_batch) == (1, 2, 32)
    if row.norm in ("bn", "gn"):
        assert cls_schedule_flags(row.norm, 1000) == {}
        assert not any(token.startswith(("--brn_", "--warmup_iters", "--mabn_")) for token in command)
    assert ("--norm_batch" in command) == (row.norm != "gn")  # GN ignores the normalization batch


def test_classification_budget_constants():
    assert CLS_ITERS_QUICK % EPOCHS == 0 and CLS_ITERS_FULL % EPOCHS == 0 and CLS_ITERS_QUICK < CLS_ITERS_FULL
    assert set(SECONDS_PER_ITER) == {row.key for row in TABLE_ROWS}
    assert estimated_seconds(Row("bn", 32), 100) == pytest.approx(FIXED_SECONDS + 100 * SECONDS_PER_ITER["BN@32"])
    # Sweep rows outside the table cost what their norm costs over groups of 2.
    assert estimated_seconds(Row("brn", 8), 100) == estimated_seconds(Row("brn", 2), 100)
    assert all(estimated_seconds(row, 10) > FIXED_SECONDS for row in sweep_rows())


@pytest.mark.parametrize("norm", ["bn", "brn", "mabn", "syncbn"])
def test_det_overrides_are_valid_config_keys(norm, tmp_path):
    from det.config import load_config

    from reproduction.detection import config_file, det_commands, det_opts

    processes = 2 if norm == "syncbn" else 1
    own = load_config(str(config_file(norm)))
    assert tiny_schedule(norm) == (own.SOLVER.MAX_ITER, tuple(own.SOLVER.STEPS), own.SOLVER.WARMUP_ITERS)
    unchanged = load_config(str(config_file(norm)), det_opts(norm, own.SOLVER.MAX_ITER, str(tmp_path), processes))
    assert tiny_schedule(norm) == (unchanged.SOLVER.MAX_ITER, tuple(unchanged.SOLVER.STEPS),
                                   unchanged.SOLVER.WARMUP_ITERS)
    half = own.SOLVER.MAX_ITER // 2
    cfg = load_config(str(config_file(norm)), det_opts(norm, half, str(tmp_path), processes))
    assert cfg.SOLVER.MAX_ITER == half
    assert tuple(cfg.SOLVER.STEPS) == tuple(round(step / 2) for step in own.SOLVER.STEPS)
    assert cfg.SOLVER.WARMUP_ITERS == round(own.SOLVER.WARMUP_ITERS / 2)
    assert cfg.SOLVER.IMS_PER_BATCH == 2 * processes and cfg.OUTPUT_DIR == str(tmp_path)
    if norm == "brn":
        assert (cfg.MODEL.BRN.WARMUP_ITERS, cfg.MODEL.BRN.R_RAMP_END, cfg.MODEL.BRN.D_RAMP_END) == tuple(
            max(1, round(value * half / 160_000)) for value in (5_000, 40_000, 25_000))
    if norm == "mabn":
        assert cfg.MODEL.MABN == own.MODEL.MABN  # the config's warm-ups, not scaled
    train, test = det_commands(norm, 300, str(tmp_path))
    assert train[-len(det_opts(norm, 300, str(tmp_path), processes)):] == det_opts(norm, 300, str(tmp_path), processes)
    assert "--skip-test" in train and train[train.index("--skip-test") - 1].endswith("train_net.py")
    assert "--skip-test" not in test and any(token.endswith("test_net.py") for token in test)
    assert ("--nproc_per_node=2" in train) == (norm == "syncbn")


def test_read_final_metrics_takes_the_last_evaluation(tmp_path):
    assert read_final_metrics(str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text(json.dumps([
        {"epoch": 5, "loss": 2.5, "top1_err": 80.0, "top5_err": 30.0},
        {"epoch": 10, "loss": 2.012345, "top1_err": 50.125, "top5_err": 15.5}]))
    assert read_final_metrics(str(tmp_path)) == {"loss": 2.012345, "top1_err": 50.125, "top5_err": 15.5}
    # The TEST lines of the log are not read any more.
    (tmp_path / "log.train-2026-1-1-0-0-0").write_text(
        "[28 01:02:09] TEST: loss = 9.000000,\tTop-1 err = 90.000000,\tTop-5 err = 90.000000,\t\n")
    assert read_final_metrics(str(tmp_path))["top1_err"] == 50.125


@pytest.mark.parametrize("content", ["", "[]", "{\"epoch\": 1}", "[{\"epoch\": 1, \"loss\": 1.0}]", "not json"])
def test_read_final_metrics_of_a_missing_or_unusable_file_is_none(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    assert read_final_metrics(str(tmp_path)) is None


def _seeds(**means):
    """Three seeds around each mean (sd 0.5): differences above 1 point count."""
    return {key.replace("_", "@"): [mean - 0.5, mean, mean + 0.5] for key, mean in means.items()}


def test_claims_follow_the_numbers():
    paper_like = _seeds(BN_32=30.0, BN_2=50.0, BRN_2=40.0, MABN_2=30.5)
    steady = speed_comparison([10.0, 10.1, 9.9, 10.0], [10.0, 10.0, 10.0, 10.1])
    verdicts = [c["verdict"] for c in check_claims(paper_like, steady, {"bn": [20.0, 21.0], "mabn": [30.0, 31.0]}, (0, 1))]
    assert verdicts == ["reproduced", "reproduced", "reproduced (within 2 points at 2 SE)", "reproduced",
                        "reproduced"]
    flat = _seeds(BN_32=30.0, BN_2=30.8, BRN_2=31.0, MABN_2=40.0)
    slow = speed_comparison([10.0] * 4, [12.0, 12.1, 11.9, 12.0])
    verdicts = [c["verdict"] for c in check_claims(flat, slow)]
    assert verdicts == ["not reproduced",
                        "not reproduced (BN@2 did not degrade by more than the rule allows: nothing to recover)",
                        "not reproduced (MABN@2 is worse than BN@32 by more than the rule allows)", "not reproduced"]
    brn_all = check_claims(_seeds(BN_32=30.0, BN_2=50.0, BRN_2=29.5, MABN_2=20.0))
    assert brn_all[1]["verdict"].startswith("reproduced (all of it")
    assert "recovers 102% of the BN@2 - BN@32 gap" in brn_all[1]["evidence"]
    assert brn_all[2]["verdict"] == "not reproduced (MABN@2 is better than BN@32 by more than the rule allows)"
    assert [c["verdict"] for c in check_claims({}, None, {})] == ["not measured"] * 5
    assert len(check_claims({})) == 4  # no detection claim when detection did not run


def test_a_match_is_not_claimed_when_the_seed_spread_hides_any_difference():
    wide = {"BN@32": [5.4, 7.9, 6.9], "MABN@2": [5.1, 27.6, 38.6]}
    matches = check_claims(wide)[2]
    assert matches["verdict"].startswith("inconclusive (the difference does not count, but the seeds' spread allows")
    assert not matches["numbers"]["counts"]


def test_one_seed_is_never_judged():
    one = {key: [value] for key, value in {"BN@32": 30.0, "BN@2": 50.0, "BRN@2": 40.0, "MABN@2": 30.0}.items()}
    claims = check_claims(one, speed_comparison([10.0] * 3, [10.0] * 3), {"bn": [20.0], "mabn": [30.0]}, (0,))
    assert [c["verdict"] for c in claims] == [ONE_SEED] * 3 + ["fewer than 4 rounds: not judged", ONE_SEED]
    assert claims[4]["evidence"] == "MABN@2 30.00 - BN@2 20.00 box AP = +10.00 points (n 1 and 1), seeds 0"


def test_a_difference_counts_beyond_two_welch_standard_errors_and_one_point():
    wide = compare([10.0, 14.0, 12.0], [8.0, 9.0])
    se = ((4.0 / 3) + (0.5 / 2)) ** 0.5
    assert wide["se"] == pytest.approx(se) and wide["threshold"] == pytest.approx(2 * se)
    assert wide["difference"] == pytest.approx(3.5) and wide["counts"] is True
    assert compare([10.0, 10.1], [10.8, 10.9])["threshold"] == 1.0  # the 1-point floor
    assert compare([10.0, 10.1], [10.8, 10.9])["counts"] is False
    assert compare([10.0], [20.0, 21.0]) == {"difference": -10.5, "n": [1, 2], "judged": False, "se": None,
                                             "threshold": None, "counts": None}


def test_speed_tolerance_is_the_spread_of_the_per_round_ratios():
    noisy = speed_comparison([10.0, 11.0, 9.0, 10.5, 9.5], [9.0, 10.0, 10.0, 10.0, 10.0])
    assert noisy["median"] == pytest.approx(1.05) and noisy["tolerance"] == pytest.approx(noisy["q3"] - noisy["q1"])
    assert noisy["within"] is True and noisy["rounds"] == 5
    tight = speed_comparison([10.0, 10.01, 9.99, 10.0], [10.5, 10.51, 10.49, 10.5])
    assert tight["within"] is False  # 5% slower with a spread well under 1%


def test_runner_runs_commands_in_order_and_stops_a_task_at_its_first_failure(tmp_path):
    marker = tmp_path / "second_ran"
    ok = Task("ok", [[sys.executable, "-c", "print('one')"], [sys.executable, "-c", "print('two')"]],
              str(tmp_path / "ok.log"), 1.0)
    bad = Task("bad", [[sys.executable, "-c", "raise SystemExit(3)"],
                       [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]], str(tmp_path / "bad.log"), 1.0, cores=2)
    results = run_tasks([ok, bad], jobs=2, env=single_thread_env(), progress=False)
    assert results["ok"].returncode == 0 and results["bad"].returncode == 3
    assert results["bad"].failed_command == list(bad.commands[0]) and not marker.exists()
    assert (tmp_path / "ok.log").read_text().splitlines()[1::2] == ["one", "two"]


def test_single_thread_env_pins_threads():
    env = single_thread_env({"REPRODUCTION_TEST_EXTRA": "1"})
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_NUM_THREADS"] == "1" and env["REPRODUCTION_TEST_EXTRA"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PYTHONHASHSEED"] == "0"
    assert "REPRODUCTION_TEST_EXTRA" not in os.environ  # a copy: the caller's environment is untouched


def test_plan_skips_detection_with_a_note_when_det_tools_are_missing(monkeypatch, tmp_path):
    import reproduction.detection
    from reproduction.cli import QUICK, build_parser, plan

    monkeypatch.setattr(reproduction.detection, "det_tools_available", lambda: "missing det/tools/train_net.py")
    args = build_parser().parse_args(["--out", str(tmp_path / "r"), "--skip", "speed"])
    run_plan = plan(args, QUICK, str(tmp_path / "r"))
    assert run_plan.notes == ["detection skipped: det's tools are not available (missing det/tools/train_net.py)"]
    assert run_plan.det_runs == [] and run_plan.speed_json is None
    names = [t.name for t in run_plan.tasks]
    assert sorted(names) == sorted([f"cls {r.key} seed {s}" for r in TABLE_ROWS for s in (0, 1, 2)] + [
        "statistics batch 2", "statistics batch 32"])
    assert {names[0].split()[0], names[1].split()[0]} == {"cls", "statistics"}  # one of each kind in turn
    assert names.index("statistics batch 32") < names.index("statistics batch 2")  # longest first
    monkeypatch.undo()
    with_det = plan(build_parser().parse_args(["--out", str(tmp_path / "r")]), QUICK, str(tmp_path / "r"))
    assert with_det.tasks[0].name == "inference speed" and with_det.tasks[0].cores == 2  # alone, first
    assert {task.kind for task in with_det.tasks[1:4]} == {"det", "cls", "statistics"} and with_det.notes == []
    assert [(r["norm"], r["seed"]) for r in with_det.det_runs] == [("bn", 0), ("mabn", 0)]
    assert with_det.det_runs[0]["iterations"] == tiny_schedule("bn").max_iter
    assert all(command[-2:] == ["SEED", "0"] for command in with_det.tasks[1].commands)


def test_full_budget_trains_every_detection_norm_over_two_seeds(tmp_path):
    from reproduction.cli import FULL, build_parser, plan

    args = build_parser().parse_args(["--out", str(tmp_path / "r"), "--full", "--skip", "classification", "speed",
                                      "statistics"])
    runs = plan(args, FULL, str(tmp_path / "r")).det_runs
    assert [(r["norm"], r["seed"], r["processes"]) for r in runs] == [
        (norm, seed, 2 if norm == "syncbn" else 1) for norm in ("bn", "brn", "gn", "mabn", "syncbn") for seed in (0, 1)]


def test_det_iters_scales_the_detection_run_and_must_be_positive(tmp_path):
    from reproduction.cli import _budget, _check, build_parser, plan

    args = build_parser().parse_args(["--out", str(tmp_path / "r"), "--det_iters", "300"])
    assert plan(args, _budget(args), str(tmp_path / "r")).det_runs[0]["iterations"] == 300
    refused = build_parser().parse_args(["--det_iters", "0"])
    with pytest.raises(UserError, match="--det_iters must be at least 1, got 0"):
        _check(refused, _budget(refused))


def test_fluctuation_is_the_spread_over_iterations_relative_to_the_magnitude():
    from reproduction.statistics import fluctuation

    assert fluctuation([1.0, -1.0, 1.0, -1.0]) == 1.0
    assert fluctuation([2.0, 2.0, 2.0]) == 0.0
    assert fluctuation([10.0, 12.0]) == pytest.approx(1.0 / 11.0)
    assert fluctuation([0.0, 0.0]) == float("inf")
