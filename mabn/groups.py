"""Normalization groups: ``B`` consecutive samples of a batch share their statistics.

MABN (``split_batch=True``), Batch Renormalization and ghost BN all simulate a small
normalization batch ``B`` inside a larger SGD batch. The checks live here once.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["check_group_size", "count_groups"]


def check_group_size(B: object, *, allow_none: bool = False) -> Optional[int]:
    """``B`` itself when it is a positive int (or None where ``allow_none``); raises otherwise."""
    if B is None and allow_none:
        return None
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        allowed = "None or a positive int" if allow_none else "a positive int"
        raise ValueError(f"B (the normalization batch size) must be {allowed}, got {B!r}")
    return B


def count_groups(layer_name: str, B: Optional[int], batch: int) -> int:
    """``batch // B`` (1 when ``B`` is None); raises when ``batch`` is not a multiple of ``B``."""
    if B is None:
        return 1
    if batch % B != 0:
        raise ValueError(f"{layer_name} normalizes groups of B={B} consecutive samples, but the batch "
                         f"has {batch} samples; use a batch size divisible by {B}")
    return batch // B
