"""Run subprocess tasks a few at a time, one thread each, with a progress bar and an ETA.

Each :class:`Task` is a sequence of commands run one after another (e.g. train, then evaluate),
with its output in a log file, an estimate of its duration and, per command, a
:class:`~reproduction.progress.Stage` that may read the command's progress from the log. The bar
shows the elapsed share of the expected wall time, and the ETA is the remaining time of the
schedule as :func:`reproduction.progress.eta` predicts it from the paces observed so far.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from reproduction.progress import TAIL_BYTES, RunningState, Snapshot, Stage, eta, stage_done, starts

__all__ = ["Task", "TaskResult", "single_thread_env", "run_tasks"]

POLL_SECONDS = 0.5
REFRESH_SECONDS = {True: 1.0, False: 30.0}  # bar redraws on a terminal / into a log file


@dataclass
class Task:
    """Commands run in order until one fails; ``cores`` is how many of the ``jobs`` slots it takes
    (``jobs`` or more: it runs alone). ``stages``: one per command, for the progress read from the log."""

    name: str
    commands: Sequence[Sequence[str]]
    log_path: str
    estimate_s: float
    cores: int = 1
    stages: Sequence[Stage] = ()

    @property
    def kind(self) -> str:
        """The first word of the name (``cls``, ``det``, ...): tasks of one kind share a pace."""
        return self.name.split()[0]


@dataclass
class TaskResult:
    name: str
    returncode: int
    seconds: float
    log_path: str
    failed_command: Optional[List[str]] = None


def single_thread_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a task: one intra-op thread, no GPU, hash seed fixed."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra or {})
    return env


@dataclass
class _Running:
    task: Task
    process: subprocess.Popen
    log: object
    started: float
    command_index: int = 0


@dataclass
class _State:
    """The runner's bookkeeping between polls."""

    pending: List[Task]
    jobs: int
    env: Dict[str, str]
    running: List[_Running] = field(default_factory=list)
    results: Dict[str, TaskResult] = field(default_factory=dict)
    finished: List[tuple] = field(default_factory=list)  # (kind, estimate, seconds) of the tasks that succeeded


def _start(task: Task, index: int, log_handle, env: Dict[str, str]) -> subprocess.Popen:
    log_handle.write(f"$ {' '.join(task.commands[index])}\n")
    log_handle.flush()
    return subprocess.Popen(list(task.commands[index]), stdout=log_handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)


def _launch_ready(state: _State) -> None:
    """Start pending tasks in order by :func:`reproduction.progress.starts`."""
    busy = sum(min(r.task.cores, state.jobs) for r in state.running)
    while state.pending and starts(busy, min(state.pending[0].cores, state.jobs), state.jobs, bool(state.running)):
        task = state.pending.pop(0)
        os.makedirs(os.path.dirname(task.log_path) or ".", exist_ok=True)
        handle = open(task.log_path, "w", encoding="utf-8")
        state.running.append(_Running(task, _start(task, 0, handle, state.env), handle, time.monotonic()))
        busy += min(task.cores, state.jobs)


def _poll(state: _State, report) -> None:
    """Advance tasks whose command ended: start the next command, or record the task's result."""
    for item in list(state.running):
        code = item.process.poll()
        if code is None:
            continue
        if code == 0 and item.command_index + 1 < len(item.task.commands):
            item.command_index += 1
            item.process = _start(item.task, item.command_index, item.log, state.env)
            continue
        item.log.close()
        seconds = time.monotonic() - item.started
        failed = None if code == 0 else list(item.task.commands[item.command_index])
        state.results[item.task.name] = TaskResult(item.task.name, code, seconds, item.task.log_path, failed)
        state.running.remove(item)
        if code == 0:
            state.finished.append((item.task.kind, item.task.estimate_s, seconds))
        else:
            report(f"{item.task.name}: exit status {code} (log: {item.task.log_path})")


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _snapshot(state: _State, now: float) -> Snapshot:
    """The runner's state as :func:`reproduction.progress.eta` reads it."""
    running = []
    for item in state.running:
        done = stage_done(item.task.stages, item.command_index, _log_tail(item.task.log_path)) \
            if item.task.stages else None
        running.append(RunningState(item.task.kind, item.task.estimate_s, item.task.cores, now - item.started, done))
    pending = [(task.kind, task.estimate_s, task.cores) for task in state.pending]
    return Snapshot(list(state.finished), running, pending, state.jobs)


def _refresh(bar, state: _State, started: float, now: float) -> None:
    remaining = eta(_snapshot(state, now)) if (state.pending or state.running) else 0.0
    elapsed = now - started
    bar.n = 100.0 * elapsed / max(elapsed + remaining, 1e-9)
    names = ", ".join(r.task.name for r in state.running)
    bar.set_postfix_str(f"ETA {datetime.timedelta(seconds=round(remaining))}" + (f"; {names}" if names else ""),
                        refresh=False)
    bar.refresh()


def _stop(running: Sequence[_Running]) -> None:
    """Terminate (then kill) the processes this runner started and close their logs."""
    for item in running:
        item.process.terminate()
        try:
            item.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            item.process.kill()
        item.log.close()


def run_tasks(tasks: Sequence[Task], jobs: int, env: Dict[str, str], progress: bool = True,
              description: str = "reproduce") -> Dict[str, TaskResult]:
    """Run ``tasks`` in order, at most ``jobs`` slots busy at once; results by task name."""
    from tqdm import tqdm

    bar = tqdm(total=100.0, desc=description, disable=not progress, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")
    state = _State(list(tasks), jobs, env)
    started = time.monotonic()
    refresh_every = REFRESH_SECONDS[sys.stderr.isatty()]
    last_refresh = -refresh_every
    try:
        while state.pending or state.running:
            _launch_ready(state)
            time.sleep(POLL_SECONDS)
            _poll(state, lambda message: bar.write(message, file=sys.stderr))
            now = time.monotonic()
            if progress and (now - last_refresh >= refresh_every or not (state.pending or state.running)):
                last_refresh = now
                _refresh(bar, state, started, now)
    finally:
        _stop(state.running)  # empty unless interrupted
        bar.close()
    return state.results
