"""The log of a run: console, log file, TensorBoard scalars and tqdm bars (rank 0 writes).

The log file is ``<save>/<prefix>-<year>-<month>-<day>-<hour>-<minute>-<second>`` (no zero
padding, as the published trainers named it), lines ``[<day> <hh>:<mm>:<ss>] message``. The name
is claimed with an exclusive create, so two runs started within the same second write two
files (``.1``, ``.2``, ... appended to the second one) instead of interleaving one. A fixed
``file_name`` (maskrcnn-benchmark's ``log.txt``) is appended to instead, run after run.
TensorBoard and tqdm are imported only when used.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from mabn.utils.checkpoint import write_text_atomic

__all__ = ["RunLog", "claim_log_path", "MetricsFile"]

_FORMAT = "[%(asctime)s] %(message)s"
_DATE_FORMAT = "%d %H:%M:%S"  # the published "%d %I:%M:%S", on a 24-hour clock


def claim_log_path(directory: str, prefix: str) -> str:
    """Create and return a new, empty log file named after the current local time."""
    t = time.localtime()
    base = os.path.join(directory, f"{prefix}-{t.tm_year}-{t.tm_mon}-{t.tm_mday}-{t.tm_hour}-{t.tm_min}-{t.tm_sec}")
    for counter in range(1000):
        path = base if counter == 0 else f"{base}.{counter}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: 1000 log files of the same second already exist")


class RunLog:
    """Console + file logging, TensorBoard and progress bars for one run; only warnings (with a
    ``[rank N]`` prefix) off rank 0.

    ``logger_name`` is the :mod:`logging` logger it owns (its handlers are replaced);
    ``file_prefix`` names a new time-stamped log file per run; ``file_name`` (with
    ``file_prefix=None``) a fixed log file that every run appends to; neither: no file.
    ``tensorboard_dir`` (relative to ``save_dir``) enables the TensorBoard writer; ``progress``
    enables the tqdm bars.
    """

    def __init__(self, save_dir: str, is_main: bool, rank: int = 0, logger_name: str = "mabn",
                 file_prefix: Optional[str] = None, tensorboard_dir: Optional[str] = "tb",
                 progress: bool = True, file_name: Optional[str] = None):
        if file_prefix is not None and file_name is not None:
            raise ValueError(f"RunLog: file_prefix {file_prefix!r} and file_name {file_name!r} both given; "
                             f"pass file_prefix=None to append to {file_name!r}")
        self.save_dir = save_dir
        self.is_main = is_main
        self.show_progress = progress and is_main
        self.logger = logging.getLogger(logger_name)
        self._close_handlers()
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO if is_main else logging.WARNING)
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(("" if is_main else f"[rank {rank}] ") + _FORMAT, _DATE_FORMAT))
        self.logger.addHandler(console)
        self.path: Optional[str] = None
        self.writer = None
        if not is_main:
            return
        os.makedirs(save_dir, exist_ok=True)
        if file_name is not None:
            self.path = os.path.join(save_dir, file_name)
        elif file_prefix is not None:
            self.path = claim_log_path(save_dir, file_prefix)
        if self.path is not None:
            handler = logging.FileHandler(self.path, mode="a")
            handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
            self.logger.addHandler(handler)
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(save_dir, tensorboard_dir))

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict, step: int) -> None:
        """Every ``tag: value`` of ``values`` at ``step``."""
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def progress(self, total: int, initial: int = 0, desc: str = ""):
        """A tqdm bar on stderr (disabled off rank 0 or with ``progress=False``)."""
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                    disable=not self.show_progress)

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

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class MetricsFile:
    """``path`` (a run's ``metrics.json``): a list of ``{key: position, **values}``, one entry per
    evaluation, rewritten atomically by the main process (the others write nothing). An entry for
    a position already listed is replaced; entries after ``start`` (the position a resumed run
    starts from) left by an earlier run, and an unreadable file, are dropped."""

    def __init__(self, path: str, key: str, start: int, is_main: bool):
        self.path = path
        self.key = key
        self.is_main = is_main
        self.entries: List[Dict[str, Any]] = []
        if is_main and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as stream:
                    entries = json.load(stream)
                self.entries = [e for e in entries if isinstance(e, dict) and isinstance(e.get(key), int)
                                and e[key] <= start]
            except (OSError, ValueError, TypeError):
                self.entries = []

    def record(self, position: int, values: Mapping[str, Any]) -> None:
        """Add (or replace) the entry of ``position`` and rewrite the file."""
        if not self.is_main:
            return
        self.entries = [e for e in self.entries if e.get(self.key) != position]
        self.entries.append({self.key: position, **values})
        write_text_atomic(self.path, json.dumps(self.entries, indent=1))
