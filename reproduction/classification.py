"""The classification rows: ``python -m cls.train`` commands and the numbers of their runs (the last
evaluation in each run's ``metrics.json``).

Every row trains ResNet-20 at 32 px on the embedded dataset with SGD batch 32 in one process, the
same iterations, learning-rate schedule and seed; only the norm and its normalization batch
differ. The learning rate is 0.05, multiplied by 0.1 after 70% and 90% of the run (the schedule
of ``configs/cls/demo_resnet20_*.yaml``).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from reproduction.schedules import BRN_SCHEDULE, MABN_CLS_SCHEDULE, scale_schedule

__all__ = ["Row", "TABLE_ROWS", "SWEEP_NORMS", "SWEEP_BATCHES", "EPOCHS", "PAPER_TOP1", "cls_schedule_flags",
           "cls_command", "read_final_metrics", "sweep_rows"]

SGD_BATCH = 32
EPOCHS = 10
LR_MILESTONES = (7, 9)
LEARNING_RATE = 0.05
MA_BATCH = 32
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
    command = [sys.executable, "-m", "cls.train", "--arch", "resnet20", "--image_size", "32", "--dataset", "synthetic",
               "--batch_size", str(SGD_BATCH), "--norm", row.norm,
               "--iters_per_epoch", str(iterations // EPOCHS), "--total_epoch", str(EPOCHS),
               "--lr_milestones", *map(str, LR_MILESTONES), "--learning_rate", str(LEARNING_RATE),
               "--val_batch_size", "250", "--save_interval", str(EPOCHS), "--eval_interval", "0",
               "--workers", "0", "--seed", str(seed), "--device", "cpu", "--no-progress", "--save", save,
               *data_flags]
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
