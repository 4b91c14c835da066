"""Keep ``torch.compile`` from recomputing values that depend on buffers updated in place.

AOTAutograd's partitioner may recompute cheap forward values in the backward instead of saving
them. When such a value was computed from a running statistic that the same forward then
updates in place (Batch Renorm's ``r`` and ``d``), the recomputation reads the UPDATED buffer
and the gradients come out wrong (torch 2.14: silently with inductor, a version-counter error
with ``aot_eager_decomp_partition``). Passing the value through an opaque custom op makes it a
saved tensor: the partitioner cannot recompute through the op. Eager mode saves what autograd
saves anyway, so there the values pass through untouched.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

__all__ = ["saved_for_backward"]


@torch.library.custom_op("mabn::saved_for_backward", mutates_args=())
def _copies(tensors: List[Tensor]) -> List[Tensor]:
    return [t.clone() for t in tensors]


@_copies.register_fake
def _(tensors):
    return [torch.empty_like(t) for t in tensors]


def saved_for_backward(*tensors: Tensor) -> List[Tensor]:
    """``tensors`` without gradient; under ``torch.compile``, copies that the compiled backward
    saves rather than recomputes."""
    detached = [t.detach() if t.requires_grad else t for t in tensors]
    return _copies(detached) if torch.compiler.is_compiling() else detached
