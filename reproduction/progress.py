"""Progress and remaining time of a set of tasks run a few at a time.

A task is planned as one :class:`Stage` per command, each with an estimate in seconds (from the
constants the parts measure on one unloaded thread). A stage with a ``pattern`` reports its own
progress: the last match in its log counts the units (iterations, epochs, rounds) done, so a
running task advances with its real work instead of with the clock. The observed pace (actual
seconds per estimated second) of finished tasks and of the measured share of running tasks
corrects the estimates: pooled over every task, then per kind (``cls``, ``det``, ...), each
shrunk toward the pooled one while it rests on little evidence. The remaining time is the end of
a simulated schedule of the running and pending tasks on the slots, the same greedy rule as the
runner's, so a long task at the end counts as the tail it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

__all__ = ["Stage", "RunningState", "Snapshot", "interleave", "stage_done", "pace", "remaining_seconds", "starts",
           "makespan", "eta"]

T = TypeVar("T")
PRIOR_SECONDS = 10.0     # weight (in estimated seconds) of the prior pace 1.0 and of the pooled pace per kind
OVERRUN_FLOOR = 0.05     # a task past its estimate still has this share of it left
TAIL_BYTES = 65536       # how much of the end of a log is searched for progress lines


@dataclass(frozen=True)
class Stage:
    """One command of a task: its estimated seconds and, optionally, how its log counts progress.

    ``pattern`` is a regular expression whose group 1 is the count of ``units`` done so far;
    ``startup_s`` of the estimate passes before the first unit (imports, data).
    """

    seconds: float
    pattern: Optional[str] = None
    units: int = 0
    startup_s: float = 0.0

    def done(self, log_tail: str) -> Optional[float]:
        """Estimated seconds of this stage done, from the last progress line in ``log_tail``."""
        if self.pattern is None or self.units <= 0:
            return None
        matches = re.findall(self.pattern, log_tail)
        if not matches:
            return None
        share = min(1.0, int(matches[-1]) / self.units)
        return self.startup_s + share * max(0.0, self.seconds - self.startup_s)


@dataclass(frozen=True)
class RunningState:
    """A running task: its kind, estimate, slots, seconds since it started and estimated seconds done
    (None when its log has not reported yet)."""

    kind: str
    estimate_s: float
    cores: int
    elapsed_s: float
    done_s: Optional[float]


@dataclass(frozen=True)
class Snapshot:
    """What the runner knows at one moment: finished tasks as (kind, estimate, actual seconds),
    the running ones, and the pending ones as (kind, estimate, cores) in start order."""

    finished: Sequence[Tuple[str, float, float]]
    running: Sequence[RunningState]
    pending: Sequence[Tuple[str, float, int]]
    jobs: int


def interleave(items: Sequence[T], kind: Callable[[T], str], seconds: Callable[[T], float]) -> List[T]:
    """One item of each kind in turn (kinds by their longest item, each kind longest first): the long
    tasks start early, and every kind starts early enough for its pace to be observed."""
    groups: Dict[str, List[T]] = {}
    for item in sorted(items, key=lambda item: -seconds(item)):
        groups.setdefault(kind(item), []).append(item)
    queues = list(groups.values())
    ordered: List[T] = []
    while any(queues):
        ordered += [queue.pop(0) for queue in queues if queue]
    return ordered


def stage_done(stages: Sequence[Stage], command_index: int, log_tail: str) -> Optional[float]:
    """Estimated seconds of a task done: its finished stages, plus the running stage's reported share
    (None while the running stage has not reported and no stage has finished)."""
    before = sum(stage.seconds for stage in stages[:command_index])
    current = stages[command_index].done(log_tail) if command_index < len(stages) else None
    if current is None:
        return before if before > 0 else None
    return before + current


def pace(snapshot: Snapshot) -> Dict[str, float]:
    """Actual seconds per estimated second, per kind (key ``""``: all kinds pooled)."""
    actual: Dict[str, float] = {}
    planned: Dict[str, float] = {}
    evidence = [(kind, estimate, seconds) for kind, estimate, seconds in snapshot.finished]
    evidence += [(r.kind, r.done_s, r.elapsed_s) for r in snapshot.running if r.done_s]
    for kind, estimate, seconds in evidence:
        for key in ("", kind):
            actual[key] = actual.get(key, 0.0) + seconds
            planned[key] = planned.get(key, 0.0) + estimate
    pooled = (PRIOR_SECONDS + actual.get("", 0.0)) / (PRIOR_SECONDS + planned.get("", 0.0))
    paces = {"": pooled}
    for key in planned:
        if key:
            paces[key] = (PRIOR_SECONDS * pooled + actual[key]) / (PRIOR_SECONDS + planned[key])
    return paces


def remaining_seconds(task: RunningState, kind_pace: float) -> float:
    """Seconds a running task still needs: at its own pace, blended with its kind's by its reported
    share; without a report, what is left of its corrected estimate (at least a small share)."""
    expected = kind_pace * task.estimate_s
    if not task.done_s:
        return max(expected - task.elapsed_s, OVERRUN_FLOOR * expected)
    share = min(1.0, task.done_s / task.estimate_s)
    own = task.elapsed_s / task.done_s
    blended = share * own + (1.0 - share) * kind_pace
    return max(blended * (task.estimate_s - task.done_s), OVERRUN_FLOOR * expected)


def starts(busy: int, slots: int, jobs: int, anything_running: bool) -> bool:
    """The start rule of the runner and of its simulation: a task taking ``slots`` (its cores, at
    most ``jobs``) starts when they are free beside the ``busy`` ones, and always when nothing runs."""
    return busy + slots <= jobs or not anything_running


def makespan(running: Sequence[Tuple[float, int]], pending: Sequence[Tuple[float, int]], jobs: int) -> float:
    """End of the greedy schedule: ``pending`` (seconds, cores) start in order by :func:`starts`
    (a task wider than ``jobs`` takes all of them)."""
    active: List[List[float]] = [[seconds, min(cores, jobs)] for seconds, cores in running]
    queue = [(seconds, min(cores, jobs)) for seconds, cores in pending]
    clock = 0.0
    while queue or active:
        busy = sum(slots for _, slots in active)
        while queue and starts(busy, queue[0][1], jobs, bool(active)):
            seconds, slots = queue.pop(0)
            active.append([seconds, slots])
            busy += slots
        step = min(seconds for seconds, _ in active)
        clock += step
        for item in active:
            item[0] -= step
        active = [item for item in active if item[0] > 1e-9]
    return clock


def eta(snapshot: Snapshot) -> float:
    """Seconds until every task has ended, by the paces observed so far."""
    paces = pace(snapshot)
    running = [(remaining_seconds(task, paces.get(task.kind, paces[""])), task.cores) for task in snapshot.running]
    pending = [(paces.get(kind, paces[""]) * estimate, cores) for kind, estimate, cores in snapshot.pending]
    return makespan(running, pending, snapshot.jobs)
