"""Stop cleanly on SIGTERM (schedulers, ``torchrun``) and SIGINT (Ctrl-C).

A handler only sets a :class:`StopFlag`; the training loop reads it once per iteration, finishes
the iteration, saves a checkpoint that resumes exactly there and exits with status 0. A second
SIGINT while the first is being honoured raises ``KeyboardInterrupt`` as usual, for a user who
does not want to wait.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Tuple

__all__ = ["StopFlag", "STOP_SIGNALS", "stop_on_signals"]

STOP_SIGNALS: Tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """Set from a signal handler (or by hand); read once per iteration."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def request(self, name: str = "stop") -> None:
        self.requested = True
        self.signal_name = self.signal_name or name


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: Tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopFlag]:
    """Within the block, ``signals`` set ``flag`` instead of terminating the process; the previous
    handlers come back afterwards. Off the main thread (where Python cannot install handlers)
    the block runs without them."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame) -> None:
        if signum == signal.SIGINT and flag.requested:
            raise KeyboardInterrupt
        flag.request(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
