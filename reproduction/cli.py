"""``python -m reproduction [--full] [--out results]``: the miniature reproduction, one command.

Plans the runs of a budget (quick by default, ``--full`` for more iterations, seeds, the
error-versus-normalization-batch sweep and the detection table), runs the inference-speed
benchmark alone first (nothing else competes for the cores while it times), then the training
runs as subprocesses ``--jobs`` at a time with one thread each, and writes ``results.md``,
``results.json`` and the figures into one results folder that is locked while the run lasts.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mabn.utils.errors import UserError
from reproduction import classification, detection

__all__ = ["Budget", "QUICK", "FULL", "build_parser", "plan", "main"]

# Estimates (seconds on one unloaded CPU thread) of the parts; classification and detection export
# theirs with the commands they build.
CLS_ITERS_QUICK, CLS_ITERS_FULL = classification.CLS_ITERS_QUICK, classification.CLS_ITERS_FULL
CLS_FIXED_SECONDS = classification.FIXED_SECONDS
DET_SECONDS_PER_ITER, DET_EVAL_SECONDS = detection.DET_SECONDS_PER_ITER, detection.DET_EVAL_SECONDS
SYNCBN_SLOWDOWN = 1.3                   # two processes of SyncBN, communication included
STAT_SECONDS_PER_ITER = {2: 0.04, 32: 0.2}  # ResNet-20 at 32 px, recording every BN layer
STAT_FIXED_SECONDS = 10.0               # start-up and the final evaluation
SPEED_SETUP_SECONDS = 15.0              # building and folding the seven ResNet-50s
SPEED_SECONDS_PER_PIXEL = 3.0e-6        # one ResNet-50 forward, per image pixel


@dataclass(frozen=True)
class Budget:
    """How long each part runs. Every classification row gets ``cls_iters`` and every seed; every
    detection norm every ``det_seeds``."""

    name: str
    cls_iters: int
    seeds: Tuple[int, ...]
    stat_iters: int
    det_iters: Optional[int]  # None: the longest of the tiny configs' own schedules, for every norm
    det_norms: Tuple[str, ...]
    det_seeds: Tuple[int, ...]
    sweep: bool
    speed_batch: int
    speed_resolution: int
    speed_rounds: int
    speed_warmup: int = 3


QUICK = Budget("quick", cls_iters=CLS_ITERS_QUICK, seeds=(0, 1, 2), stat_iters=200, det_iters=None,
               det_norms=("bn", "mabn"), det_seeds=(0,), sweep=False, speed_batch=8, speed_resolution=112,
               speed_rounds=20)
FULL = Budget("full", cls_iters=CLS_ITERS_FULL, seeds=(0, 1, 2, 3, 4), stat_iters=1000, det_iters=None,
              det_norms=("bn", "brn", "gn", "mabn", "syncbn"), det_seeds=(0, 1), sweep=True, speed_batch=8,
              speed_resolution=224, speed_rounds=20)
PARTS = ("classification", "speed", "statistics", "detection")


class _Parser(argparse.ArgumentParser):
    """Bad flags raise :class:`UserError` (one line, exit status 2) instead of printing the usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m reproduction", allow_abbrev=False,
        description="Miniature reproduction of the MABN paper's tables and figures on the embedded data "
                    "(quick: about 15 minutes on 2 CPU cores).")
    parser.add_argument("--out", default="results", help="results folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing results folder")
    parser.add_argument("--full", action="store_true",
                        help="more iterations and seeds, the error-vs-normalization-batch sweep, the detection table")
    parser.add_argument("--iters", type=int, default=None,
                        help=f"classification iterations per row, a multiple of 10, the same for every row "
                             f"(default: {QUICK.cls_iters}, --full {FULL.cls_iters})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"classification seeds (default: {_listed(QUICK.seeds)}, --full {_listed(FULL.seeds)})")
    parser.add_argument("--stat_iters", type=int, default=None,
                        help=f"iterations of each statistics run (default: {QUICK.stat_iters}, --full {FULL.stat_iters})")
    parser.add_argument("--det_seeds", type=int, nargs="+", default=None,
                        help=f"detection seeds (default: {_listed(QUICK.det_seeds)}, --full {_listed(FULL.det_seeds)})")
    parser.add_argument("--det_iters", type=int, default=None,
                        help="detection training iterations of every norm, each tiny config's LR schedule scaled "
                             "to them (default: the longest of the configs' own schedules)")
    parser.add_argument("--speed_batch", type=int, default=None,
                        help=f"images per forward in the speed table (default: {QUICK.speed_batch})")
    parser.add_argument("--speed_resolution", type=int, default=None,
                        help=f"image side in the speed table (default: {QUICK.speed_resolution}, --full "
                             f"{FULL.speed_resolution})")
    parser.add_argument("--speed_rounds", type=int, default=None,
                        help=f"timed rounds in the speed table (default: {QUICK.speed_rounds})")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[], help="parts not to run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--data_cache", default=None, help="cache of the embedded datasets (default: $MABN_CACHE "
                                                           "or ~/.cache/mabn)")
    parser.add_argument("--train_per_class", type=int, default=None,
                        help="embedded classification training images per class (default: cls's 600)")
    parser.add_argument("--val_per_class", type=int, default=None,
                        help="embedded classification validation images per class (default: cls's 100)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _listed(values: Sequence[int]) -> str:
    return " ".join(map(str, values))


def _budget(args: argparse.Namespace) -> Budget:
    budget = FULL if args.full else QUICK
    changes = {key: getattr(args, key) for key in ("stat_iters", "det_iters", "speed_batch", "speed_resolution",
                                                   "speed_rounds") if getattr(args, key) is not None}
    if args.iters is not None:
        changes["cls_iters"] = args.iters
    if args.seeds is not None:
        changes["seeds"] = tuple(args.seeds)
    if args.det_seeds is not None:
        changes["det_seeds"] = tuple(args.det_seeds)
    return dataclasses.replace(budget, **changes)


def _check(args: argparse.Namespace, budget: Budget) -> None:
    """Refuse bad flags with one line before any work."""
    from reproduction.classification import EPOCHS

    if budget.cls_iters < EPOCHS or budget.cls_iters % EPOCHS:
        raise UserError(f"--iters {budget.cls_iters}: use a positive multiple of {EPOCHS} (the run has {EPOCHS} "
                        f"epochs; the learning rate drops after epochs 7 and 9)")
    for flag, value in (("--stat_iters", budget.stat_iters), ("--det_iters", budget.det_iters),
                        ("--speed_batch", budget.speed_batch), ("--speed_rounds", budget.speed_rounds),
                        ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if budget.speed_resolution < 64:
        raise UserError(f"--speed_resolution must be at least 64 (ResNet-50 downsamples 32x and IN needs more "
                        f"than one value per channel), got "
                        f"{budget.speed_resolution}")
    for flag, seeds in (("--seeds", budget.seeds), ("--det_seeds", budget.det_seeds)):
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise UserError(f"{flag} must be distinct non-negative integers, got {list(seeds)}")
    for flag in ("train_per_class", "val_per_class"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.overwrite is False and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it or choose another --out")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; give a folder")


def _data_flags(args: argparse.Namespace) -> List[str]:
    flags = []
    if args.train_per_class is not None:
        flags += ["--synthetic_train_per_class", str(args.train_per_class)]
    if args.val_per_class is not None:
        flags += ["--synthetic_val_per_class", str(args.val_per_class)]
    return flags


@dataclass
class Plan:
    """The tasks to run and what each one is."""

    tasks: list
    cls_runs: List[dict]
    stat_runs: List[dict]
    det_runs: List[dict]
    speed_json: Optional[str]
    notes: List[str]


def _log(out: str, name: str) -> str:
    return os.path.join(out, "logs", f"{name}.log")


def _detection_tasks(budget: Budget, out: str) -> Tuple[list, List[dict]]:
    """Train then evaluate each norm and seed, all for the same iterations (``--det_iters``, else the
    longest of the tiny configs' own schedules); training reports its iterations in its log."""
    from reproduction.detection import det_commands, tiny_schedule
    from reproduction.progress import Stage
    from reproduction.runner import Task

    iterations = budget.det_iters or max(tiny_schedule(norm).max_iter for norm in budget.det_norms)
    tasks, runs = [], []
    for norm in budget.det_norms:
        for seed in budget.det_seeds:
            folder = os.path.join(out, "runs", "det", f"{norm}_seed{seed}")
            cores = 2 if norm == "syncbn" else 1
            slowdown = SYNCBN_SLOWDOWN if cores == 2 else 1.0
            stages = (Stage(slowdown * DET_SECONDS_PER_ITER * iterations, r"\biter: (\d+)", iterations),
                      Stage(slowdown * DET_EVAL_SECONDS))
            commands = [command + ["SEED", str(seed)] for command in det_commands(norm, iterations,
                                                                                  os.path.abspath(folder))]
            tasks.append(Task(f"det {norm} seed {seed}", commands, _log(out, f"det_{norm}_seed{seed}"),
                              sum(stage.seconds for stage in stages), cores, stages))
            runs.append({"norm": norm, "seed": seed, "folder": folder, "processes": cores, "iterations": iterations})
    return tasks, runs


def _classification_tasks(budget: Budget, out: str, data: List[str]) -> Tuple[list, List[dict]]:
    """Every row (and the sweep's with ``--full``) for every seed; each reports its epochs in its log."""
    from reproduction.classification import EPOCHS, TABLE_ROWS, cls_command, estimated_seconds, sweep_rows
    from reproduction.progress import Stage
    from reproduction.runner import Task

    rows = list(TABLE_ROWS) + ([row for row in sweep_rows() if row not in TABLE_ROWS] if budget.sweep else [])
    tasks, runs = [], []
    for row in rows:
        stage = Stage(estimated_seconds(row, budget.cls_iters), r"TRAIN Epoch (\d+):", EPOCHS, CLS_FIXED_SECONDS)
        for seed in budget.seeds:
            name = f"{row.key.replace('@', '_b')}_seed{seed}"
            folder = os.path.join(out, "runs", "cls", name)
            tasks.append(Task(f"cls {row.key} seed {seed}", [cls_command(row, budget.cls_iters, seed, folder, data)],
                              _log(out, f"cls_{name}"), stage.seconds, 1, (stage,)))
            runs.append({"key": row.key, "norm": row.norm, "norm_batch": row.norm_batch, "seed": seed,
                         "folder": folder, "in_table": row in TABLE_ROWS})
    return tasks, runs


def _statistics_tasks(budget: Budget, out: str, data: List[str]) -> Tuple[list, List[dict]]:
    from reproduction.runner import Task
    from reproduction.statistics import STAT_BATCHES, statistics_command

    tasks, runs = [], []
    for batch in STAT_BATCHES:
        folder = os.path.join(out, "runs", "statistics", f"bn_batch{batch}")
        tasks.append(Task(f"statistics batch {batch}", [statistics_command(batch, budget.stat_iters, folder, data)],
                          _log(out, f"statistics_batch{batch}"),
                          STAT_FIXED_SECONDS + STAT_SECONDS_PER_ITER[batch] * budget.stat_iters))
        runs.append({"batch": batch, "folder": folder})
    return tasks, runs


def _speed_task(budget: Budget, out: str, jobs: int):
    """The inference benchmark, taking every slot so that it runs alone; it reports its rounds."""
    from reproduction.progress import Stage
    from reproduction.runner import Task
    from reproduction.speed import VARIANTS

    speed_json = os.path.join(out, "runs", "speed.json")
    command = [sys.executable, "-m", "reproduction.speed", "--out", speed_json, "--batch", str(budget.speed_batch),
               "--resolution", str(budget.speed_resolution), "--rounds", str(budget.speed_rounds),
               "--warmup", str(budget.speed_warmup)]
    per_round = len(VARIANTS) * SPEED_SECONDS_PER_PIXEL * budget.speed_batch * budget.speed_resolution ** 2
    startup = SPEED_SETUP_SECONDS + per_round * budget.speed_warmup
    stage = Stage(startup + per_round * budget.speed_rounds, r"speed: round (\d+)/", budget.speed_rounds, startup)
    return Task("inference speed", [command], _log(out, "speed"), stage.seconds, jobs, (stage,)), speed_json


def plan(args: argparse.Namespace, budget: Budget, out: str) -> Plan:
    """Every subprocess of the run: the speed benchmark alone first, then the others one kind after
    another, longest first within a kind (:func:`reproduction.progress.interleave`)."""
    from reproduction.detection import det_tools_available
    from reproduction.progress import interleave

    skip = set(args.skip)
    data = _data_flags(args)
    tasks: list = []
    det_runs: List[dict] = []
    cls_runs: List[dict] = []
    stat_runs: List[dict] = []
    notes: List[str] = []
    if "detection" not in skip:
        missing = det_tools_available()
        if missing is not None:
            notes.append(f"detection skipped: det's tools are not available ({missing})")
        else:
            det_tasks, det_runs = _detection_tasks(budget, out)
            tasks += det_tasks
    if "classification" not in skip:
        cls_tasks, cls_runs = _classification_tasks(budget, out, data)
        tasks += cls_tasks
    if "statistics" not in skip:
        stat_tasks, stat_runs = _statistics_tasks(budget, out, data)
        tasks += stat_tasks
    tasks = interleave(tasks, lambda task: task.kind, lambda task: task.estimate_s)
    speed_json = None
    if "speed" not in skip:
        speed, speed_json = _speed_task(budget, out, args.jobs)
        tasks.insert(0, speed)
    return Plan(tasks, cls_runs, stat_runs, det_runs, speed_json, notes)


def _prepare_folder(out: str, overwrite: bool) -> None:
    """Empty ``out`` but for its lock file (only called while holding the lock)."""
    from mabn.utils.lock import LOCK_NAME

    if not overwrite:
        return
    for name in os.listdir(out):
        if name == LOCK_NAME:
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def run(argv: Optional[Sequence[str]] = None) -> int:
    from mabn.utils.lock import FolderLock
    from reproduction.detection import REPO_ROOT
    from reproduction.progress import makespan
    from reproduction.report import collect, write_outputs
    from reproduction.runner import run_tasks, single_thread_env

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    budget = _budget(args)
    _check(args, budget)
    out = args.out
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    started = time.monotonic()
    with FolderLock(out, flag="--out"):
        _prepare_folder(out, args.overwrite)
        run_plan = plan(args, budget, out)
        estimate = makespan([], [(task.estimate_s, task.cores) for task in run_plan.tasks], args.jobs)
        print(f"{budget.name} run: {len(run_plan.tasks)} runs, about {estimate / 60:.0f} min on {args.jobs} unloaded "
              f"cores; results in {out}/", file=sys.stderr, flush=True)
        extra_env = {"MABN_CACHE": os.path.abspath(os.path.expanduser(args.data_cache))} if args.data_cache else {}
        env = single_thread_env(extra_env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        try:
            results = run_tasks(run_plan.tasks, args.jobs, env, progress=args.progress, description=budget.name)
        except KeyboardInterrupt:
            print(f"interrupted: the runs were stopped; their logs are in {os.path.join(out, 'logs')}",
                  file=sys.stderr)
            return 130
        if extra_env:
            os.environ.update(extra_env)
        report = collect(run_plan, results, budget, args, started_at, time.monotonic() - started)
        write_outputs(out, report)
        print(f"wrote {os.path.join(out, 'results.md')} ({report['wall_time_s'] / 60:.1f} min)", file=sys.stderr)
    return 0 if not report["failures"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0: every part ran; 1: some part failed (see results.md); 2: bad input; 130: interrupted."""
    from mabn.utils.errors import run_cli

    return run_cli(lambda: run(argv))
