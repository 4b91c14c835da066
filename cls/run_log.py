"""The log file, console logging and TensorBoard writer of a run (rank 0 writes).

Log file: ``<save>/log.train-<year>-<month>-<day>-<hour>-<minute>-<second>`` (no zero padding, as
published), lines ``[<day> <hh>:<mm>:<ss>] message``. The epoch and test lines keep the published
formats::

    TRAIN Epoch 3: lr = 0.100000,\tloss = 2.345678,\tTop-1 err = 61.234568,\tTop-5 err = 20.123457,\t
    TEST: loss = 2.012345,\tTop-1 err = 50.123457,\tTop-5 err = 15.123457,\t
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

__all__ = ["LOGGER_NAME", "RunLog", "train_line", "test_line"]

LOGGER_NAME = "cls"
_FORMAT = "[%(asctime)s] %(message)s"
_DATE_FORMAT = "%d %H:%M:%S"  # the published "%d %I:%M:%S", on a 24-hour clock


def train_line(epoch: int, lr: float, loss: float, top1_err: float, top5_err: float) -> str:
    return (f"TRAIN Epoch {epoch}: lr = {lr:.6f},\tloss = {loss:.6f},\t"
            f"Top-1 err = {top1_err:.6f},\tTop-5 err = {top5_err:.6f},\t")


def test_line(loss: float, top1_err: float, top5_err: float) -> str:
    return f"TEST: loss = {loss:.6f},\tTop-1 err = {top1_err:.6f},\tTop-5 err = {top5_err:.6f},\t"


class RunLog:
    """Console + file logging and TensorBoard for one run; inert (warnings only) off rank 0."""

    def __init__(self, save_dir: str, is_main: bool, rank: int = 0, file_log: bool = True, tensorboard: bool = True):
        self.save_dir = save_dir
        self.is_main = is_main
        self.logger = logging.getLogger(LOGGER_NAME)
        self._close_handlers()
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO if is_main else logging.WARNING)
        console = logging.StreamHandler(sys.stdout)
        prefix = "" if is_main else f"[rank {rank}] "
        console.setFormatter(logging.Formatter(prefix + _FORMAT, _DATE_FORMAT))
        self.logger.addHandler(console)
        self.path: Optional[str] = None
        self.writer = None
        if is_main:
            os.makedirs(save_dir, exist_ok=True)
            if file_log:
                t = time.localtime()
                self.path = os.path.join(save_dir, f"log.train-{t.tm_year}-{t.tm_mon}-{t.tm_mday}-"
                                                   f"{t.tm_hour}-{t.tm_min}-{t.tm_sec}")
                handler = logging.FileHandler(self.path)
                handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
                self.logger.addHandler(handler)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(save_dir, "tb"))

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def _close_handlers(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        self._close_handlers()
