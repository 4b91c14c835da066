"""Tests for mabn.running_stats: the one commit that keeps running statistics finite, and the
empty-batch rule shared by the three layers that use it (ghost BN, Batch Renormalization,
SyncBN). Non-finite batches through each layer: test_ghost_batchnorm_nonfinite.py and
test_sync_batchnorm.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mabn.batch_renorm import BatchRenorm2d
from mabn.ghost_batchnorm import GhostBatchNorm2d
from mabn.running_stats import FiniteRunningStats
from mabn.sync_batchnorm import SyncBatchNorm

C = 3

LAYERS = {  # name -> factory(momentum); SyncBatchNorm runs single-process (no process group)
    "ghost-G1": lambda momentum: GhostBatchNorm2d(C, B=4, momentum=momentum),
    "ghost-G2": lambda momentum: GhostBatchNorm2d(C, B=2, momentum=momentum),
    "brn": lambda momentum: BatchRenorm2d(C, momentum=momentum or 0.1),
    "brn-B2": lambda momentum: BatchRenorm2d(C, momentum=momentum or 0.1, B=2),
    "sync": lambda momentum: SyncBatchNorm(C, momentum=momentum),
}


class _CommitOnly(FiniteRunningStats, nn.BatchNorm1d):
    """The mixin on a plain BatchNorm: forward commits the given statistics as they are."""

    def forward(self, stats: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._commit_running_stats(*stats)


def _trained(name: str, momentum) -> nn.Module:
    torch.manual_seed(0)
    m = LAYERS[name](momentum)
    for step in range(2):
        m(torch.randn(4, C, 3, 3) * 2 + step)
    return m


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_commit_copies_finite_statistics_and_counts_the_step():
    m = _CommitOnly(C, dtype=torch.float64)
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])  # float32 into float64
    m((mean, var))
    assert torch.equal(m.running_mean, mean.double()) and torch.equal(m.running_var, var.double())
    assert m.num_batches_tracked.item() == 1 and m.skipped_updates.item() == 0


@pytest.mark.parametrize("where", ["mean", "var"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_commit_skips_when_any_value_is_non_finite(where, bad):
    m = _CommitOnly(C)
    m((torch.ones(C), torch.full((C,), 2.0)))
    before = _state(m)
    mean, var = torch.full((C,), 7.0), torch.full((C,), 8.0)
    (mean if where == "mean" else var)[1] = bad
    m((mean, var))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(m.state_dict()[k], before[k]), k
    assert m.skipped_updates.item() == 1 and m.skipped_updates.dtype == torch.long
    assert m.skipped_updates.shape == ()


def test_counter_follows_the_buffers_device_and_tracking():
    assert _CommitOnly(C, device="meta").skipped_updates.device.type == "meta"
    untracked = _CommitOnly(C, track_running_stats=False)
    assert untracked.skipped_updates is None and "skipped_updates" not in untracked.state_dict()
    untracked.load_state_dict(nn.BatchNorm1d(C, track_running_stats=False).state_dict())
    untracked.reset_running_stats()  # nothing to reset, no error


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name", list(LAYERS))
def test_empty_batch_leaves_every_buffer_unchanged(name, momentum):
    m = _trained(name, momentum)
    before = _state(m)
    x = torch.randn(0, C, 3, 3, requires_grad=True)
    y = m(x)
    assert y.shape == (0, C, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.num_batches_tracked.item() == 2 and m.skipped_updates.item() == 0
    assert m.eval()(x.detach()).shape == (0, C, 3, 3)
