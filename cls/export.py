"""``--export_folded PATH``: the inference model with every norm folded into its conv.

Uses the core's ``mabn.fold.fold_norms`` (an eval-mode copy in which each conv followed by a
BN-like norm is one conv with bias). The whole module is saved with ``torch.save`` (load it with
``torch.load(PATH, weights_only=False)``, only for a file you made; the ``cls`` and ``mabn``
packages must be importable), after checking that it reproduces the eval-mode outputs on a
sample batch.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from mabn.fold import fold_norms
from mabn.utils.checkpoint import save_atomic

__all__ = ["export_folded"]


@torch.no_grad()
def export_folded(model: nn.Module, path: str, sample: Optional[torch.Tensor] = None) -> Tuple[nn.Module, float]:
    """Fold ``model`` (left unchanged), save it to ``path``; return it and the max output difference."""
    folded = fold_norms(model)  # an eval-mode copy
    difference = float("nan")
    if sample is not None:
        expected = copy.deepcopy(model).eval()(sample)
        difference = (folded(sample) - expected).abs().max().item()
    save_atomic(folded.cpu(), path)
    return folded, difference
