"""The ``cuda`` marker: tests of what only a CUDA device can show (kernels, NCCL, autocast's CUDA
casts, CUDA-event timing). Run them on a GPU machine with ``python -m pytest -m cuda``; without
a CUDA device they are reported as skipped, with the reason.

``MABN_CUDA_TESTS_DEVICE=cpu`` runs the marked tests that do not need CUDA itself on the CPU
instead (through the ``cuda_device`` fixture), to check the test code on a machine without a GPU.
Tests that need CUDA itself (NCCL, CUDA events, CUDA autocast) take the ``real_cuda_device`` fixture.

The ``step_events`` fixture records the order of a trainer's steps and its host syncs (a copy of
a value to the host, which on CUDA waits for the queued kernels).
"""
from __future__ import annotations

import os
from typing import Callable, List

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


# Tensor methods that copy a value to the host, so that on CUDA they wait for the queued kernels.
HOST_SYNCS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu"}


class StepEvents:
    """Events of training steps in order, in ``events``: the calls wrapped by :meth:`named`, and
    every host sync (the method's name) on a tensor marked by :meth:`track` or derived from one."""

    def __init__(self) -> None:
        self.events: List[str] = []
        events = self.events

        class Tracked(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in HOST_SYNCS:
                    events.append(name)
                return super().__torch_function__(func, types, args, kwargs or {})

        self._tracked = Tracked

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.as_subclass(self._tracked)

    def named(self, name: str, call: Callable) -> Callable:
        """``call``, recording ``name`` before it runs."""
        def recorded(*args, **kwargs):
            self.events.append(name)
            return call(*args, **kwargs)

        return recorded


@pytest.fixture()
def step_events() -> StepEvents:
    return StepEvents()
