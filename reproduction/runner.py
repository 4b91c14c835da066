"""Run subprocess tasks a few at a time, one thread each, with a progress bar and an ETA.

Each :class:`Task` is a sequence of commands run one after another (e.g. train, then evaluate),
with its output in a log file and an estimate of its duration. The bar advances with the
estimated share of every running task (capped below its whole share until it ends), so the ETA
moves smoothly between task ends; a finished task counts its whole share.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["Task", "TaskResult", "single_thread_env", "run_tasks"]

POLL_SECONDS = 0.5
REFRESH_SECONDS = {True: 1.0, False: 30.0}  # bar redraws on a terminal / into a log file


@dataclass
class Task:
    """Commands run in order until one fails; ``cores`` is how many of the ``jobs`` slots it takes."""

    name: str
    commands: Sequence[Sequence[str]]
    log_path: str
    estimate_s: float
    cores: int = 1


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
    durations: List[float] = field(default_factory=list)


def _start(task: Task, index: int, log_handle, env: Dict[str, str]) -> subprocess.Popen:
    log_handle.write(f"$ {' '.join(task.commands[index])}\n")
    log_handle.flush()
    return subprocess.Popen(list(task.commands[index]), stdout=log_handle, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env)


def run_tasks(tasks: Sequence[Task], jobs: int, env: Dict[str, str], progress: bool = True,
              description: str = "reproduce") -> Dict[str, TaskResult]:
    """Run ``tasks`` in order, at most ``jobs`` cores busy at once; results by task name."""
    from tqdm import tqdm

    total = sum(t.estimate_s for t in tasks) or 1.0
    bar = tqdm(total=round(total), desc=description, unit="s(est)", disable=not progress, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining} {postfix}")
    pending = list(tasks)
    running: List[_Running] = []
    results: Dict[str, TaskResult] = {}
    done_share = 0.0
    refresh_every = REFRESH_SECONDS[sys.stderr.isatty()]
    last_refresh = 0.0
    try:
        while pending or running:
            busy = sum(r.task.cores for r in running)
            while pending and (busy + min(pending[0].cores, jobs) <= jobs or not running):
                task = pending.pop(0)
                os.makedirs(os.path.dirname(task.log_path) or ".", exist_ok=True)
                handle = open(task.log_path, "w", encoding="utf-8")
                running.append(_Running(task, _start(task, 0, handle, env), handle, time.monotonic()))
                busy += min(task.cores, jobs)
            time.sleep(POLL_SECONDS)
            for item in list(running):
                code = item.process.poll()
                if code is None:
                    continue
                if code == 0 and item.command_index + 1 < len(item.task.commands):
                    item.command_index += 1
                    item.process = _start(item.task, item.command_index, item.log, env)
                    continue
                item.log.close()
                failed = None if code == 0 else list(item.task.commands[item.command_index])
                results[item.task.name] = TaskResult(item.task.name, code, time.monotonic() - item.started,
                                                     item.task.log_path, failed)
                running.remove(item)
                done_share += item.task.estimate_s
                if code != 0:
                    bar.write(f"{item.task.name}: exit status {code} (log: {item.task.log_path})")
            now = time.monotonic()
            if now - last_refresh >= refresh_every or not (pending or running):
                last_refresh = now
                partial = sum(min(0.95, (now - r.started) / max(r.task.estimate_s, 1e-9)) * r.task.estimate_s
                              for r in running)
                bar.n = round(min(total, done_share + partial))
                bar.set_postfix_str(", ".join(r.task.name for r in running), refresh=False)
                bar.refresh()
    finally:
        for item in running:  # interrupted: stop what this function started
            item.process.terminate()
            try:
                item.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                item.process.kill()
            item.log.close()
        bar.close()
    return results
