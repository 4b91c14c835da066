"""mabn.utils.lock: one run per output folder; the holder's pid in the message."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mabn.utils.errors import UserError
from mabn.utils.lock import FolderLock


def test_a_second_lock_fails_at_once_with_the_pid(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(str(folder), "--save") as lock:
        assert lock.held and folder.is_dir()
        with pytest.raises(UserError, match=rf"--save {folder} is in use by another run \(pid {os.getpid()}, "):
            FolderLock(str(folder), "--save").acquire()
    with FolderLock(str(folder), "--save"):  # released: free again
        pass


def test_a_dead_holder_leaves_the_folder_free(tmp_path):
    code = "import sys; from mabn.utils.lock import FolderLock; FolderLock(sys.argv[1], '--save').acquire(); sys.exit(0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    with FolderLock(str(tmp_path), flag="--output") as lock:
        assert lock.held
