"""The ``cuda`` marker: tests of what only a CUDA device can show (kernels, NCCL, autocast's CUDA
casts, CUDA-event timing). Run them on a GPU machine with ``python -m pytest -m cuda``; without
a CUDA device they are reported as skipped, with the reason.

``MABN_CUDA_TESTS_DEVICE=cpu`` runs the marked tests that do not need CUDA itself on the CPU
instead (through the ``cuda_device`` fixture), to check the test code on a machine without a GPU.
Tests that need CUDA itself (NCCL, CUDA events, CUDA autocast) take the ``real_cuda_device`` fixture.
"""
from __future__ import annotations

import os

import pytest
import torch

CPU_OVERRIDE = os.environ.get("MABN_CUDA_TESTS_DEVICE") == "cpu"
NO_CUDA_REASON = "needs a CUDA device (run `python -m pytest -m cuda` on a GPU machine)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or CPU_OVERRIDE:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def cuda_device() -> torch.device:
    """The device of a ``cuda``-marked test: CUDA, or the CPU under ``MABN_CUDA_TESTS_DEVICE=cpu``."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture()
def real_cuda_device() -> torch.device:
    """CUDA itself: the test is skipped without a CUDA device, also under the CPU override."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    return torch.device("cuda")
