"""Fixtures of the ``cls`` trainer tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def embedded_cache(tmp_path_factory) -> Path:
    """Point the embedded dataset cache at a temporary directory (never ~/.cache in tests) and
    use one intra-op thread, for the tests of this directory (restored afterwards)."""
    cache = tmp_path_factory.mktemp("mabn_cache")
    previous = os.environ.get("MABN_CACHE")
    threads = torch.get_num_threads()
    os.environ["MABN_CACHE"] = str(cache)
    torch.set_num_threads(1)
    yield cache
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("MABN_CACHE", None)
    else:
        os.environ["MABN_CACHE"] = previous
