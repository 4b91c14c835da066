"""``python scripts/reproduce.py [--full] [--out results]``: the miniature reproduction, one command.

Plans the runs of a budget (quick by default, ``--full`` for more iterations, seeds, the
error-versus-normalization-batch sweep and the detection table), runs them as subprocesses
``--jobs`` at a time with one thread each, then writes ``results.md``, ``results.json`` and the
figures into one results folder that is locked while the run lasts.
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

__all__ = ["Budget", "QUICK", "FULL", "build_parser", "plan", "main"]


@dataclass(frozen=True)
class Budget:
    """How long each part runs. Every classification row gets ``cls_iters`` and every seed."""

    name: str
    cls_iters: int
    seeds: Tuple[int, ...]
    stat_iters: int
    det_iters: Optional[int]  # None: each tiny config's own schedule
    det_norms: Tuple[str, ...]
    sweep: bool
    speed_batch: int
    speed_resolution: int
    speed_rounds: int
    speed_warmup: int = 3


QUICK = Budget("quick", cls_iters=1000, seeds=(0,), stat_iters=200, det_iters=None, det_norms=("mabn",), sweep=False,
               speed_batch=8, speed_resolution=112, speed_rounds=20)
FULL = Budget("full", cls_iters=3000, seeds=(0, 1, 2), stat_iters=1000, det_iters=None,
              det_norms=("bn", "brn", "mabn", "syncbn"), sweep=True, speed_batch=8, speed_resolution=224,
              speed_rounds=20)
PARTS = ("classification", "speed", "statistics", "detection")

# Seconds per unit on one unloaded CPU thread (for the ETA only; measured on a 2-core AMD EPYC).
CLS_SECONDS_PER_ITER = {32: 0.17}
CLS_FIXED_SECONDS = 10.0
STAT_SECONDS_PER_ITER = {2: 0.05, 32: 0.3}
DET_SECONDS_PER_ITER, DET_EVAL_SECONDS = 0.5, 30.0


class _Parser(argparse.ArgumentParser):
    """Bad flags raise :class:`UserError` (one line, exit status 2) instead of printing the usage."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scripts/reproduce.py", allow_abbrev=False,
        description="Miniature reproduction of the MABN paper's tables and figures on the embedded data "
                    "(quick: about 30 minutes on 2 CPU cores).")
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
    parser.add_argument("--det_iters", type=int, default=None,
                        help="detection training iterations, the tiny config's LR schedule scaled to them "
                             "(default: the config's own schedule, 2250 iterations)")
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
    return dataclasses.replace(budget, **changes)


def _check(args: argparse.Namespace, budget: Budget) -> None:
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
    if len(set(budget.seeds)) != len(budget.seeds) or min(budget.seeds) < 0:
        raise UserError(f"--seeds must be distinct non-negative integers, got {list(budget.seeds)}")
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


def plan(args: argparse.Namespace, budget: Budget, out: str) -> Plan:
    """Every subprocess of the run, longest first within each kind so that two slots stay busy."""
    from reproduction.classification import TABLE_ROWS, cls_command, sweep_rows
    from reproduction.detection import det_commands, det_tools_available, tiny_schedule
    from reproduction.runner import Task
    from reproduction.statistics import STAT_BATCHES, statistics_command

    skip = set(args.skip)
    data = _data_flags(args)
    logs = os.path.join(out, "logs")
    tasks, cls_runs, stat_runs, det_runs, notes = [], [], [], [], []
    speed_json = None
    if "detection" not in skip:
        missing = det_tools_available()
        if missing is not None:
            notes.append(f"detection skipped: det's tools are not available ({missing})")
        else:
            for norm in budget.det_norms:
                folder = os.path.join(out, "runs", "det", norm)
                cores = 2 if norm == "syncbn" else 1
                iterations = tiny_schedule(norm).max_iter if budget.det_iters is None else budget.det_iters
                tasks.append(Task(f"det {norm}", det_commands(norm, iterations, os.path.abspath(folder)),
                                  os.path.join(logs, f"det_{norm}.log"),
                                  (DET_SECONDS_PER_ITER * iterations + DET_EVAL_SECONDS) * (1.3 if cores == 2 else 1),
                                  cores))
                det_runs.append({"norm": norm, "folder": folder, "processes": cores, "iterations": iterations})
    if "classification" not in skip:
        rows = list(TABLE_ROWS)
        if budget.sweep:
            rows += [row for row in sweep_rows() if row not in rows]
        for row in rows:
            for seed in budget.seeds:
                folder = os.path.join(out, "runs", "cls", f"{row.key.replace('@', '_b')}_seed{seed}")
                estimate = CLS_FIXED_SECONDS + CLS_SECONDS_PER_ITER[32] * budget.cls_iters
                tasks.append(Task(f"cls {row.key} seed {seed}", [cls_command(row, budget.cls_iters, seed, folder, data)],
                                  os.path.join(logs, f"cls_{row.key.replace('@', '_b')}_seed{seed}.log"), estimate))
                cls_runs.append({"key": row.key, "norm": row.norm, "norm_batch": row.norm_batch, "seed": seed,
                                 "folder": folder, "in_table": row in TABLE_ROWS})
    if "statistics" not in skip:
        for batch in STAT_BATCHES:
            folder = os.path.join(out, "runs", "statistics", f"bn_batch{batch}")
            tasks.append(Task(f"statistics batch {batch}", [statistics_command(batch, budget.stat_iters, folder, data)],
                              os.path.join(logs, f"statistics_batch{batch}.log"),
                              CLS_FIXED_SECONDS + STAT_SECONDS_PER_ITER[batch] * budget.stat_iters))
            stat_runs.append({"batch": batch, "folder": folder})
    if "speed" not in skip:
        speed_json = os.path.join(out, "runs", "speed.json")
        command = [sys.executable, "-m", "reproduction.speed", "--out", speed_json, "--batch", str(budget.speed_batch),
                   "--resolution", str(budget.speed_resolution), "--rounds", str(budget.speed_rounds),
                   "--warmup", str(budget.speed_warmup)]
        per_call = 0.015 * budget.speed_batch * (budget.speed_resolution / 64) ** 2
        tasks.append(Task("inference speed", [command], os.path.join(logs, "speed.log"),
                          20.0 + 6 * 2.0 * per_call * (budget.speed_rounds + budget.speed_warmup)))
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
        estimate = sum(t.estimate_s * min(t.cores, args.jobs) for t in run_plan.tasks) / args.jobs
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
