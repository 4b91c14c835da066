"""``import mabn`` and every ``mabn.utils`` module need torch alone: the trainer extras are
imported inside the functions that use them."""
from __future__ import annotations

import subprocess
import sys

_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorboard", "filelock", "yaml", "cv2", "matplotlib"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import mabn
import mabn.utils.checkpoint, mabn.utils.data, mabn.utils.distributed, mabn.utils.errors, mabn.utils.lock
import mabn.utils.run_log, mabn.utils.signals, mabn.utils.train_loop, mabn.utils.yaml_config
print("ok")
"""


def test_mabn_utils_import_without_trainer_extras():
    result = subprocess.run([sys.executable, "-c", _BLOCK], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
