"""Loss, top-k counts and the running sums behind the log lines."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = ["LABEL_SMOOTHING", "label_smoothing_loss", "topk_correct", "Meter"]

LABEL_SMOOTHING = 0.1


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy against ``(1 - 0.1) * onehot + 0.1 / K`` (the published loss).

    ``-sum_k q_k log p_k`` with that ``q`` is exactly torch's ``label_smoothing=0.1``.
    """
    return F.cross_entropy(logits.float(), target, label_smoothing=LABEL_SMOOTHING, reduction=reduction)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a float tensor).

    ``k`` larger than the number of classes counts every sample.
    """
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(target.view(-1, 1))
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks]).to(torch.float64)


class Meter:
    """Sums of loss, top-1 and top-5 hits and samples; errors in percent."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.top1 = 0.0
        self.top5 = 0.0
        self.count = 0.0

    def add(self, loss_sum: float, top1: float, top5: float, count: float) -> None:
        self.loss_sum += loss_sum
        self.top1 += top1
        self.top5 += top5
        self.count += count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1.0)

    @property
    def top1_err(self) -> float:
        return 100.0 * (1.0 - self.top1 / max(self.count, 1.0))

    @property
    def top5_err(self) -> float:
        return 100.0 * (1.0 - self.top5 / max(self.count, 1.0))

    def state_dict(self) -> Dict[str, float]:
        return {"loss_sum": self.loss_sum, "top1": self.top1, "top5": self.top5, "count": self.count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        for key in ("loss_sum", "top1", "top5", "count"):
            setattr(self, key, float(state.get(key, 0.0)))
