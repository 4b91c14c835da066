"""Schedules in absolute iterations, scaled to a miniature run at the fraction of the source run.

Batch Renorm (Ioffe, 2017) and MABN publish their schedules as iteration counts of runs that are
hundreds of thousands of iterations long. In a run of 1,000 iterations those counts would never
be reached (Batch Renorm would stay plain BN throughout), so each count is scaled to the same
fraction of the miniature run as it has of the published run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

__all__ = ["PublishedSchedule", "BRN_SCHEDULE", "MABN_CLS_SCHEDULE", "MABN_DET_SCHEDULE", "scale_schedule"]


@dataclass(frozen=True)
class PublishedSchedule:
    """Iteration counts of a method as published, and the length of the run they belong to."""

    method: str
    source: str
    run_length: int
    iterations: Mapping[str, int]

    def fractions(self) -> Dict[str, float]:
        return {name: value / self.run_length for name, value in self.iterations.items()}


# Ioffe 2017: r_max = 1, d_max = 0 for 5k steps, then r_max -> 3 at 40k and d_max -> 5 at 25k,
# in an Inception-v3 ImageNet run of 160k steps.
BRN_SCHEDULE = PublishedSchedule(
    "BRN", "Ioffe 2017, Inception-v3 on ImageNet, 160k steps", 160_000,
    {"warmup": 5_000, "r_ramp_end": 40_000, "d_ramp_end": 25_000})
# MABN (Yan et al. 2020), ImageNet: 120 epochs of 5000 iterations; each group's own statistics for
# 100 iterations, r = 1 for the first 1000.
MABN_CLS_SCHEDULE = PublishedSchedule(
    "MABN", "Yan et al. 2020, ResNet-50 on ImageNet, 120 epochs x 5000 iterations", 600_000,
    {"warmup": 100, "r_warmup": 1_000})
# MABN on COCO: the same counts in the 2x schedule of 180k iterations.
MABN_DET_SCHEDULE = PublishedSchedule(
    "MABN", "Yan et al. 2020, Mask R-CNN on COCO, 2x schedule, 180k iterations", 180_000,
    {"warmup": 100, "r_warmup": 1_000})


def scale_schedule(schedule: PublishedSchedule, iterations: int) -> Dict[str, int]:
    """Each count times ``iterations / run_length``, rounded, at least 1 (so every phase exists)."""
    if iterations <= 0:
        raise ValueError(f"iterations must be positive, got {iterations}")
    return {name: max(1, round(value * iterations / schedule.run_length))
            for name, value in schedule.iterations.items()}
