"""The reproduction's progress and ETA on fake tasks: log progress lines, the pace correction, the
schedule simulation, and a simulated run whose tasks take longer (or shorter) than estimated."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest

from reproduction.progress import PRIOR_SECONDS, RunningState, Snapshot, Stage, eta, interleave, makespan, pace, stage_done
from reproduction.runner import Task, run_tasks, single_thread_env


def test_a_stage_counts_the_last_progress_line_of_its_log():
    stage = Stage(110.0, r"iter: (\d+)", 200, startup_s=10.0)
    assert stage.done("loading\n") is None and Stage(5.0).done("iter: 3") is None
    assert stage.done("eta: 0:01:00  iter: 20  loss: 1\neta: 0:00:50  iter: 100  loss: 1\n") == 60.0
    assert stage.done("iter: 500\n") == 110.0  # capped at the whole stage


def test_a_task_adds_its_finished_stages():
    stages = (Stage(100.0, r"iter: (\d+)", 10), Stage(30.0))
    assert stage_done(stages, 0, "") is None
    assert stage_done(stages, 0, "iter: 5") == 50.0
    assert stage_done(stages, 1, "iter: 10\n$ python test_net.py\n") == 100.0  # evaluating: training is done


def test_makespan_follows_the_runner_rule():
    assert makespan([], [(10.0, 1)] * 3, 2) == 20.0
    assert makespan([], [(5.0, 2), (10.0, 1), (10.0, 1)], 2) == 15.0  # a task as wide as jobs runs alone
    assert makespan([(4.0, 1)], [(10.0, 2), (1.0, 1)], 2) == 15.0  # the wide task waits for the running one
    assert makespan([(3.0, 1)], [(10.0, 4)], 2) == 13.0  # wider than jobs: takes every slot
    assert makespan([], [], 2) == 0.0


def test_pace_pools_the_evidence_and_shrinks_each_kind_toward_it():
    assert pace(Snapshot([], [], [("cls", 10.0, 1)], 2)) == {"": 1.0}
    slow_det = Snapshot([("det", 600.0, 1200.0)], [RunningState("cls", 100.0, 1, 50.0, 50.0)], [], 2)
    paces = pace(slow_det)
    prior = PRIOR_SECONDS
    assert paces[""] == pytest.approx((prior + 1250) / (prior + 650))
    assert paces["det"] == pytest.approx((prior * paces[""] + 1200) / (prior + 600))
    assert paces["cls"] == pytest.approx((prior * paces[""] + 50) / (prior + 50))
    assert paces["det"] > paces[""] > paces["cls"]


def test_eta_counts_a_running_task_at_its_own_pace():
    # Half done in 100 s that were estimated as 50: twice slower, the other half takes about 100 s more.
    running = RunningState("det", 100.0, 1, 100.0, 50.0)
    assert eta(Snapshot([], [running], [], 2)) == pytest.approx(50 * (0.5 * 2.0 + 0.5 * pace(
        Snapshot([], [running], [], 2))["det"]))
    silent = RunningState("stat", 100.0, 1, 30.0, None)
    assert eta(Snapshot([], [silent], [], 2)) == 70.0
    overrun = RunningState("stat", 100.0, 1, 300.0, None)
    assert eta(Snapshot([], [overrun], [], 2)) == pytest.approx(5.0)


@dataclass
class FakeTask:
    """A planned task (kind, estimate, cores, stages) and how long it really takes."""

    kind: str
    estimate: float
    cores: int
    stages: tuple
    true_seconds: float
    started: Optional[float] = None

    def log_at(self, elapsed: float) -> tuple:
        """(command index, log text) after ``elapsed`` true seconds: progress lines proportional to time."""
        scale = self.true_seconds / self.estimate
        spent = 0.0
        for index, stage in enumerate(self.stages):
            if elapsed < spent + stage.seconds * scale or index == len(self.stages) - 1:
                if stage.pattern is None:
                    return index, ""
                inside = max(0.0, elapsed - spent - stage.startup_s * scale)
                share = inside / max((stage.seconds - stage.startup_s) * scale, 1e-9)
                units = min(stage.units, int(share * stage.units))
                return index, (stage.pattern.split(" (")[0] + f" {units}:\n") if units else ""
            spent += stage.seconds * scale
        raise AssertionError("unreachable")


def _plan(det_factor: float, cls_factor: float, other_factor: float, seed: int) -> List[FakeTask]:
    """The default run's shape: the speed benchmark alone, 2 detection runs, 15 classification runs,
    2 statistics runs; each task's true time is its estimate times its kind's factor and +-10% noise."""
    rng = random.Random(seed)
    noise = lambda: rng.uniform(0.9, 1.1)  # noqa: E731
    speed = (Stage(60.0, r"speed: round (\d+)/", 20, 15.0),)
    det = (Stage(300.0, r"iter: (\d+)", 600), Stage(30.0))
    cls = (Stage(45.0, r"TRAIN Epoch (\d+):", 10, 8.0),)
    tasks = [FakeTask("det", 330.0, 1, det, 330.0 * det_factor * noise()) for _ in range(2)]
    tasks += [FakeTask("cls", 45.0, 1, cls, 45.0 * cls_factor * noise()) for _ in range(15)]
    tasks += [FakeTask("statistics", 70.0, 1, (Stage(70.0),), 70.0 * other_factor * noise()),
              FakeTask("statistics", 20.0, 1, (Stage(20.0),), 20.0 * other_factor * noise())]
    speed = FakeTask("speed", 60.0, 2, speed, 60.0 * other_factor * noise())
    return [speed] + interleave(tasks, lambda task: task.kind, lambda task: task.estimate)


def _simulate(tasks: List[FakeTask], jobs: int = 2, step: float = 1.0) -> List[tuple]:
    """Run the fake tasks on a virtual clock with the runner's start rule; (time, eta, true end) at
    every step."""
    pending, running, finished, estimates = list(tasks), [], [], []
    clock = 0.0
    while pending or running:
        busy = sum(min(t.cores, jobs) for t in running)
        while pending and (busy + min(pending[0].cores, jobs) <= jobs or not running):
            task = pending.pop(0)
            task.started = clock
            running.append(task)
            busy += min(task.cores, jobs)
        states = []
        for task in running:
            index, text = task.log_at(clock - task.started)
            states.append(RunningState(task.kind, task.estimate, task.cores, clock - task.started,
                                       stage_done(task.stages, index, text)))
        snapshot = Snapshot(list(finished), states, [(t.kind, t.estimate, t.cores) for t in pending], jobs)
        estimates.append((clock, eta(snapshot)))
        clock += step
        for task in list(running):
            if clock - task.started >= task.true_seconds:
                running.remove(task)
                finished.append((task.kind, task.estimate, task.true_seconds))
    return [(moment, estimate, clock) for moment, estimate in estimates]


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (1.3, 1.3, 1.3), (0.75, 0.75, 0.75), (1.2, 0.9, 1.0),
                                     (0.85, 1.15, 1.1), (1.5, 0.8, 1.0)],
                         ids=lambda f: "det x{} cls x{} others x{}".format(*f))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eta_is_within_a_quarter_of_the_true_remaining_time_from_ten_percent_on(factors, seed):
    """From 10% of the run on, the ETA is within 25% of the true remaining time (15 s in the last minute,
    where one task's own +-10% is already more than a quarter of what is left)."""
    points = _simulate(_plan(*factors, seed=seed))
    end = points[0][2]
    checked = 0
    for moment, estimate, _ in points:
        remaining = end - moment
        if moment >= 0.1 * end:
            assert abs(estimate - remaining) <= 0.25 * max(remaining, 60.0), (moment, estimate, remaining)
            checked += 1
    assert checked > 500


def test_runner_reads_progress_from_the_logs_and_draws_the_bar(tmp_path, capsys):
    script = "import sys, time\nfor i in range(1, 6):\n    print(f'iter: {i}', flush=True)\n    time.sleep(0.1)\n"
    tasks = [Task(f"det {i}", [[sys.executable, "-c", script], [sys.executable, "-c", "pass"]],
                  str(tmp_path / f"{i}.log"), 2.0, 1, (Stage(1.5, r"iter: (\d+)", 5), Stage(0.5))) for i in range(3)]
    results = run_tasks(tasks, jobs=2, env=single_thread_env(), progress=True, description="fake")
    assert [results[f"det {i}"].returncode for i in range(3)] == [0, 0, 0]
    assert "iter: 5" in (tmp_path / "0.log").read_text()
    assert "fake: 100%" in capsys.readouterr().err
