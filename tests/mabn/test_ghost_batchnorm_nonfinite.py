"""Non-finite batches in GhostBatchNorm and BatchRenorm (both keep running statistics finite and
count skipped updates in ``skipped_updates``; empty batches: tests/mabn/test_running_stats.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mabn.batch_renorm import BatchRenorm2d
from mabn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d

N, C = 4, 3

LAYERS = {  # name -> factory; the batch of N samples makes 1 group or N / 2 groups
    "ghost-G1": lambda: GhostBatchNorm2d(C, B=N),
    "ghost-G2": lambda: GhostBatchNorm2d(C, B=2),
    "ghost-G2-cumulative": lambda: GhostBatchNorm2d(C, B=2, momentum=None),
    "brn": lambda: BatchRenorm2d(C, momentum=0.1, warmup_steps=0, r_ramp_end=2, d_ramp_end=2),
    "brn-B2": lambda: BatchRenorm2d(C, momentum=0.1, warmup_steps=0, r_ramp_end=2, d_ramp_end=2,
                                    B=2),
}


def _bad_input(kind: str) -> torch.Tensor:
    x = torch.randn(N, C, 3, 3, generator=torch.Generator().manual_seed(1))
    if kind == "nan-pixel":
        x[1, 0, 2, 1] = float("nan")
    elif kind == "inf":
        x[3, 2, 0, 0] = float("inf")
    elif kind == "1e30":  # finite values whose variance overflows float32
        x = x * 1e30
    return x


def _trained(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = LAYERS[name]()
    for step in range(2):
        m(torch.randn(N, C, 3, 3) * 2 + step)
    return m


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["nan-pixel", "inf", "1e30"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_statistics_skip_the_whole_update(name, kind):
    m = _trained(name)
    before = _state(m)
    assert m.skipped_updates.item() == 0 and m.num_batches_tracked.item() == 2
    x = _bad_input(kind).requires_grad_(True)
    m(x).sum().backward()  # the step itself runs; only the statistics update is skipped
    for key in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        assert torch.equal(m.state_dict()[key], before[key]), key
    assert m.skipped_updates.item() == 1

    m(torch.randn(N, C, 3, 3))  # the next finite batch updates again
    assert m.num_batches_tracked.item() == 3 and m.skipped_updates.item() == 1
    assert not torch.equal(m.running_mean, before["running_mean"])
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    m.eval()
    assert torch.isfinite(m(torch.randn(N, C, 3, 3))).all()


def test_whole_batch_ghost_keeps_nan_out_where_batchnorm_does_not():
    ghost, bn = GhostBatchNorm2d(C, B=N), nn.BatchNorm2d(C)
    x = _bad_input("nan-pixel")
    ghost(x), bn(x)
    assert torch.isnan(bn.running_mean).any()  # torch's own layer is poisoned
    assert torch.equal(ghost.running_mean, torch.zeros(C)) and ghost.skipped_updates.item() == 1


def test_cumulative_average_counts_only_applied_updates():
    ghost = GhostBatchNorm1d(C, B=2, momentum=None, dtype=torch.float64)
    good = [torch.randn(N, C, 5, dtype=torch.float64) + i for i in range(3)]
    bad = good[0].clone()
    bad[0, 0, 0] = float("nan")
    for x in (good[0], bad, good[1], good[2]):
        ghost(x)
    means = torch.stack([x.view(2, 2, C, 5).mean((1, 3)).mean(0) for x in good])
    torch.testing.assert_close(ghost.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 3 and ghost.skipped_updates.item() == 1


@pytest.mark.parametrize("name", list(LAYERS))
def test_finite_input_never_counts_a_skip(name):
    assert _trained(name).skipped_updates.item() == 0


@pytest.mark.parametrize("name", list(LAYERS))
def test_skip_counter_is_state_and_loads_from_states_without_it(name):
    m = _trained(name)
    m(_bad_input("inf"))
    state = m.state_dict()
    assert state["skipped_updates"].dtype == torch.long and state["skipped_updates"].item() == 1
    restored = LAYERS[name]()
    restored.load_state_dict(state)
    assert restored.skipped_updates.item() == 1

    old = {k: v for k, v in state.items() if k != "skipped_updates"}  # older checkpoint
    restored.load_state_dict(old)  # strict
    assert restored.skipped_updates.item() == 0
    assert torch.equal(restored.running_var, m.running_var)
    restored.load_state_dict(nn.BatchNorm2d(C).state_dict())  # a plain BatchNorm, strict
    assert restored.skipped_updates.item() == 0

    m.reset_running_stats()
    assert m.skipped_updates.item() == 0 and m.num_batches_tracked.item() == 0


def test_model_sum_of_skip_counters():
    """The trainer's contract: it sums every buffer whose name ends with ``skipped_updates``."""
    net = nn.Sequential(nn.Conv2d(C, C, 1), GhostBatchNorm2d(C, B=2), nn.Conv2d(C, C, 1),
                        BatchRenorm2d(C, B=2))
    net(_bad_input("nan-pixel"))
    counters = {name: b.item() for name, b in net.named_buffers() if name.endswith("skipped_updates")}
    assert counters == {"1.skipped_updates": 1, "3.skipped_updates": 1}


def test_untracked_ghost_has_no_counter():
    m = GhostBatchNorm2d(C, B=2, track_running_stats=False)
    assert m.skipped_updates is None and "skipped_updates" not in m.state_dict()
    m.load_state_dict(nn.BatchNorm2d(C, track_running_stats=False).state_dict())


@pytest.mark.parametrize("name", ["ghost-G2", "brn-B2", "brn"])
def test_inplace_activation_on_the_output(name):
    m, ref = _trained(name), None
    ref = copy.deepcopy(m)
    x = torch.randn(N, C, 3, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.relu_(m(x)).sum().backward()
    torch.relu(ref(x_ref)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
