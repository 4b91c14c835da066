"""The published line formats of the classification log (the log itself is
:class:`mabn.utils.run_log.RunLog`)::

    TRAIN Epoch 3: lr = 0.100000,\tloss = 2.345678,\tTop-1 err = 61.234568,\tTop-5 err = 20.123457,\t
    TEST: loss = 2.012345,\tTop-1 err = 50.123457,\tTop-5 err = 15.123457,\t
"""
from __future__ import annotations

__all__ = ["LOGGER_NAME", "LOG_PREFIX", "train_line", "test_line"]

LOGGER_NAME = "cls"
LOG_PREFIX = "log.train"  # each run writes log.train-<date>, as published


def train_line(epoch: int, lr: float, loss: float, top1_err: float, top5_err: float) -> str:
    return (f"TRAIN Epoch {epoch}: lr = {lr:.6f},\tloss = {loss:.6f},\t"
            f"Top-1 err = {top1_err:.6f},\tTop-5 err = {top5_err:.6f},\t")


def test_line(loss: float, top1_err: float, top5_err: float) -> str:
    return f"TEST: loss = {loss:.6f},\tTop-1 err = {top1_err:.6f},\tTop-5 err = {top5_err:.6f},\t"
