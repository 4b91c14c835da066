"""Fixtures of the ``det`` tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch RNG state (and leaves it as it found it)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
