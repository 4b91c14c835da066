"""The dtype in which the norms compute statistics: float32 for float16/bfloat16 inputs (e.g.
under ``torch.autocast``), so that ``x ** 2`` and sums neither overflow nor lose precision; the
input's own dtype for float32 and float64."""
from __future__ import annotations

import torch

__all__ = ["cast", "statistics_dtype"]


_FLOATING = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
             torch.float64: torch.float64}


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, the dtype itself for float32/float64 (a lookup for these:
    ``torch.promote_types`` is a dispatched op, a per-call cost on every layer's hot path)."""
    known = _FLOATING.get(dtype)
    return known if known is not None else torch.promote_types(dtype, torch.float32)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, without a call where it already is (``Tensor.to`` is a per-call cost
    even then, on every layer's hot path)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
