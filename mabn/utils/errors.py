"""Errors that the trainers (``cls``, ``det``) report as one line (``error: ...``): exit code 2
for bad input, 3 for a non-finite loss."""
from __future__ import annotations

__all__ = ["UserError", "CorruptImageError", "NonFiniteLossError", "one_line"]


class UserError(Exception):
    """Bad input: flags, config files, data directories, checkpoints."""


class CorruptImageError(UserError):
    """An image file that OpenCV cannot decode (the message names the file)."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or Inf; training stopped without saving."""


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
    for cls in (CorruptImageError, NonFiniteLossError, UserError):
        for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
    return last if len(lines) > 1 and "Traceback" in str(error) else " ".join(lines)
