"""The classification rows: ``python -m cls.train`` commands and the numbers of their runs (the last
evaluation in each run's ``metrics.json``).

Every row trains the same network on the same data with SGD batch 32 in one process, for the
same iterations, learning-rate schedule and seeds; only the norm and its normalization batch
differ (BRN's and MABN's schedules are the published ones scaled to the run by
:func:`cls_schedule_flags`). Nothing is tuned per norm. The regime, and why:

* Budget: the default reproduction finishes in about 15 minutes on 2 cores, its classification
  share being 5 rows x 3 seeds in about 10 core-minutes: about 40 s per run at one thread,
  start-up, image checks and the final evaluation (4.5 s together) included. Per iteration,
  ghost batch norm over groups of 2 (BN@2, BRN@2) costs about 1.3x plain BN, MABN about the
  same as BN, GN 0.9x; the 15 runs took 655 s (35-51 s each).
* Network ``resnet8``: the CIFAR ResNet with one basic block per stage (16/32/64 channels).
  At 24 px a BN@32 iteration takes about 25 ms of compute and 8 ms of data loading, a quarter
  of ResNet-20 at 32 px; 1.5-2x width or a second block per stage cost 1.6-3x per iteration.
* Data: the embedded dataset at difficulty ``easy`` (``cls.embedded_dataset``: one large,
  upright, high-contrast target, no distractors or lines), 16 classes, 600 training and 100
  validation images per class, rendered at 28 px once per cache (10-17 s). On the ``hard``
  level of the demo configs every norm stayed at 61-82 % error even with ResNet-20. Without the
  clutter but with targets at any rotation, BN@32 still ended at 35 % after 1000 iterations
  (seed 0): after 800 it mistook the texture in 3 % of the images, the shape in 42 %. Upright
  shapes (within 15 degrees) brought it to 5 %.
* Image size 24 px: random-resized crops of the 28 px images for training, resize to 27 and
  centre crop for evaluation. At 20 px (cheaper per iteration) BN@32 ended at 40 % after 800
  iterations, at 16 px (rotated shapes) at 42 % after 1400.
* Schedule: 1000 iterations (10 epochs of 100), learning rate 0.2, x0.1 after 70 % and 90 % of
  the run. At 0.05 and 0.1 BN@32 learnt more slowly, at 0.4 it ended 9 points worse than at
  0.2. Error falls steeply once the shapes are learnt, so seeds spread while a run ends on
  that slope: after 800 iterations BN@32 had 16.0 +- 2.7 % (seeds 0-2), after 1000
  6.7 +- 1.3 %.

With these settings (seeds 0, 1, 2) the top-1 errors were BN@32 6.7 +- 1.3 %, BN@2 30.0 +- 6.0,
BRN@2 48.8 +- 1.9, GN 36.3 +- 3.6 and MABN@2 23.7 +- 17.1 (5.1, 27.6 and 38.6: MABN's outcome
varies most from seed to seed).

:data:`CLS_ITERS_QUICK` and :data:`CLS_ITERS_FULL` are the default iterations of the quick and
full budgets; :func:`estimated_seconds` (from :data:`FIXED_SECONDS` and
:data:`SECONDS_PER_ITER`) estimates a run's wall time at one thread.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from reproduction.schedules import BRN_SCHEDULE, MABN_CLS_SCHEDULE, scale_schedule

__all__ = ["Row", "TABLE_ROWS", "SWEEP_NORMS", "SWEEP_BATCHES", "EPOCHS", "PAPER_TOP1", "CLS_ITERS_QUICK",
           "CLS_ITERS_FULL", "FIXED_SECONDS", "SECONDS_PER_ITER", "cls_schedule_flags", "cls_command",
           "estimated_seconds", "read_final_metrics", "sweep_rows"]

ARCH = "resnet8"
IMAGE_SIZE = 24
SGD_BATCH = 32
EPOCHS = 10
LR_MILESTONES = (7, 9)
LEARNING_RATE = 0.2
MA_BATCH = 32
# The embedded data of every classification run (cls.train flags), before the caller's data flags.
DATA_FLAGS = ("--synthetic_difficulty", "easy", "--synthetic_image_size", "28", "--synthetic_classes", "16",
              "--synthetic_train_per_class", "600", "--synthetic_val_per_class", "100")
CLS_ITERS_QUICK = 1000
CLS_ITERS_FULL = 2000
# One run at one thread: FIXED_SECONDS (start-up, image checks, final evaluation) plus
# SECONDS_PER_ITER[row key] for each iteration (wall seconds of runs of 10 and 1000 iterations).
FIXED_SECONDS = 4.5
SECONDS_PER_ITER = {"BN@32": 0.035, "BN@2": 0.046, "BRN@2": 0.046, "GN@2": 0.032, "MABN@2": 0.036}
SWEEP_NORMS = ("bn", "brn", "mabn")
SWEEP_BATCHES = (2, 4, 8, 16, 32)
# The paper's ImageNet table (ResNet-50, top-1 error), for reference only.
PAPER_TOP1 = {"BN@32": 23.41, "BN@2": 35.22, "BRN@2": 30.29, "MABN@2": 23.67}


@dataclass(frozen=True)
class Row:
    """One configuration of the table: the norm (cls --norm) and its normalization batch (None: GN)."""

    norm: str
    norm_batch: Optional[int]

    @property
    def key(self) -> str:
        return f"{self.norm.upper()}@{self.norm_batch if self.norm_batch is not None else 2}"


TABLE_ROWS = (Row("bn", 32), Row("bn", 2), Row("brn", 2), Row("gn", None), Row("mabn", 2))


def sweep_rows() -> List[Row]:
    return [Row(norm, batch) for norm in SWEEP_NORMS for batch in SWEEP_BATCHES]


def estimated_seconds(row: Row, iterations: int) -> float:
    """Wall seconds of one run of ``row`` at one thread; a sweep row takes its norm's cost over
    groups of 2, the highest (cost falls as the groups grow)."""
    per_iter = SECONDS_PER_ITER.get(row.key, SECONDS_PER_ITER[f"{row.norm.upper()}@2"])
    return FIXED_SECONDS + per_iter * iterations


def cls_schedule_flags(norm: str, iterations: int) -> Dict[str, int]:
    """The scaled Batch Renorm / MABN schedule flags of ``norm`` for a run of ``iterations``."""
    if norm == "brn":
        brn = scale_schedule(BRN_SCHEDULE, iterations)
        return {"brn_warmup": brn["warmup"], "brn_r_ramp_end": brn["r_ramp_end"], "brn_d_ramp_end": brn["d_ramp_end"]}
    if norm == "mabn":
        mabn_schedule = scale_schedule(MABN_CLS_SCHEDULE, iterations)
        return {"warmup_iters": mabn_schedule["warmup"], "mabn_r_warmup": mabn_schedule["r_warmup"]}
    return {}


def cls_command(row: Row, iterations: int, seed: int, save: str, data_flags: List[str]) -> List[str]:
    """``python -m cls.train ...`` for ``row``; ``iterations`` is a multiple of :data:`EPOCHS`."""
    command = [sys.executable, "-m", "cls.train", "--arch", ARCH, "--image_size", str(IMAGE_SIZE),
               "--dataset", "synthetic", "--batch_size", str(SGD_BATCH), "--norm", row.norm,
               "--iters_per_epoch", str(iterations // EPOCHS), "--total_epoch", str(EPOCHS),
               "--lr_milestones", *map(str, LR_MILESTONES), "--learning_rate", str(LEARNING_RATE),
               "--val_batch_size", "250", "--save_interval", str(EPOCHS), "--eval_interval", "0",
               "--workers", "0", "--seed", str(seed), "--device", "cpu", "--no-progress", "--save", save,
               *DATA_FLAGS, *data_flags]
    if row.norm_batch is not None:
        command += ["--norm_batch", str(row.norm_batch)]
    if row.norm == "mabn":
        command += ["--ma_batch", str(max(MA_BATCH, row.norm_batch or 1))]
    for flag, value in cls_schedule_flags(row.norm, iterations).items():
        command += [f"--{flag}", str(value)]
    return command


def read_final_metrics(save: str) -> Optional[Dict[str, float]]:
    """Loss, top-1 and top-5 error of the last evaluation in the run's ``metrics.json`` (written by
    ``cls.train``, one entry per evaluated epoch); None when there is no such file or entry, or
    the file is not what ``cls.train`` writes."""
    try:
        with open(os.path.join(save, "metrics.json"), encoding="utf-8") as stream:
            entries = json.load(stream)
        last = max((e for e in entries if isinstance(e, dict) and "epoch" in e), key=lambda e: e["epoch"])
        return {key: float(last[key]) for key in ("loss", "top1_err", "top5_err")}
    except (OSError, ValueError, TypeError, KeyError):
        return None
