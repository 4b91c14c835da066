"""Errors that the trainers (``cls``, ``det``) report as one line (``error: ...``): exit status 2
for bad input, 3 for a non-finite loss or state."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

__all__ = ["UserError", "CorruptImageError", "NonFiniteError", "NonFiniteLossError", "NonFiniteStateError",
           "EXIT_BAD_INPUT", "EXIT_NON_FINITE", "exit_status", "one_line", "report", "run_cli"]

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


class UserError(Exception):
    """Bad input: flags, config files, data directories, checkpoints."""


class CorruptImageError(UserError):
    """An image file that OpenCV cannot decode (the message names the file)."""


class NonFiniteError(UserError):
    """Training produced NaN or Inf; the run stops and the last good checkpoint stays (exit 3)."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or Inf; training stopped without saving."""


class NonFiniteStateError(NonFiniteError):
    """A parameter, buffer or optimizer tensor became NaN or Inf; the checkpoint was not written."""


_REPORTED = (CorruptImageError, NonFiniteLossError, NonFiniteStateError, NonFiniteError, UserError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line.

    Errors raised inside DataLoader workers reach the main process re-wrapped, with the worker's
    traceback in the message; the last line of that text is ``module.Class: message``, whose
    message part is what we want.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    for cls in _REPORTED:
        for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
    return last if len(lines) > 1 and "Traceback" in str(error) else " ".join(lines)


def exit_status(error: BaseException) -> Optional[int]:
    """3 for NaN/Inf, 2 for bad input (also a re-wrapped :class:`CorruptImageError` from a
    DataLoader worker), None for anything else (a bug: let it raise)."""
    if isinstance(error, NonFiniteError):
        return EXIT_NON_FINITE
    if isinstance(error, UserError):
        return EXIT_BAD_INPUT
    if isinstance(error, RuntimeError) and CorruptImageError.__name__ in str(error):
        return EXIT_BAD_INPUT
    return None


def report(error: BaseException) -> None:
    """``error: <one line>`` on stderr (``error (rank N): ...`` on the other ranks of a launch)."""
    rank = os.environ.get("RANK", "0")
    prefix = "error" if rank in ("", "0") else f"error (rank {rank})"
    print(f"{prefix}: {one_line(error)}", file=sys.stderr, flush=True)


def run_cli(run: Callable[[], int]) -> int:
    """``run()``, with the errors of :func:`exit_status` reported as one line and turned into
    exit statuses; anything else propagates with its traceback."""
    try:
        return run()
    except (UserError, RuntimeError) as exc:
        status = exit_status(exc)
        if status is None:
            raise
        report(exc)
        return status
