"""An exclusive lock on an output folder, so that two runs never write into the same one.

The lock is an ``fcntl.flock`` on ``<folder>/.lock`` holding the owner's pid; the kernel drops it
when the process exits, however it exits, so a crashed run never leaves the folder locked (the
file itself stays, empty of meaning). A second run fails at once with the holder's pid.
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

from mabn.utils.errors import UserError

__all__ = ["FolderLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class FolderLock:
    """``with FolderLock(folder, flag):`` creates the folder and locks it, or raises a
    :class:`UserError` naming the pid that holds it and the app's ``flag`` for the folder."""

    def __init__(self, folder: str, flag: str):
        self.folder = folder
        self.flag = flag
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.flag} {self.folder} is in use by another run (pid {holder}, lock {self.path}); "
                            f"wait for it to finish or choose another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
