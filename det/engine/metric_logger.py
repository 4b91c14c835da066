"""Smoothed training meters and the published maskrcnn-benchmark log line.

``eta: 0:12:34  iter: 20  loss: 1.2345 (1.4567)  loss_classifier: ...  time: 0.5123 (0.5301)
data: 0.0102 (0.0154)  lr: 0.020000  max mem: 2345``: each meter as the median of the last 20
values and, in parentheses, the average since the run (re)started; ``max mem`` in MiB (CUDA's
peak allocation on a GPU, the process's peak resident memory on the CPU).
"""
from __future__ import annotations

import datetime
import resource
import statistics
from collections import deque
from typing import Dict

import torch

__all__ = ["SmoothedValue", "MetricLogger", "max_memory_mib"]


class SmoothedValue:
    """A series of values: median over a window and the global average."""

    def __init__(self, window_size: int = 20):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.window.append(value)
        self.total += value
        self.count += 1

    @property
    def median(self) -> float:
        return statistics.median(self.window)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


class MetricLogger:
    """Named :class:`SmoothedValue` meters, printed as ``name: median (average)``."""

    def __init__(self, delimiter: str = "  ", window_size: int = 20):
        self.meters: Dict[str, SmoothedValue] = {}
        self.delimiter = delimiter
        self.window_size = window_size

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue(self.window_size)).update(float(value))

    def __getitem__(self, name: str) -> SmoothedValue:
        return self.meters[name]

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter.median:.4f} ({meter.global_avg:.4f})"
                                   for name, meter in self.meters.items())

    def line(self, iteration: int, max_iter: int, lr: float, memory_mib: float) -> str:
        """The published log line at ``iteration`` (completed steps)."""
        seconds = self.meters["time"].global_avg * (max_iter - iteration) if "time" in self.meters else 0.0
        eta = str(datetime.timedelta(seconds=int(seconds)))
        return self.delimiter.join([f"eta: {eta}", f"iter: {iteration}", str(self), f"lr: {lr:.6f}",
                                    f"max mem: {memory_mib:.0f}"])


def max_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
