"""The published ImageNet MABN layer, exactly: ``MABN2d(C, B=2, real_B=32, split_batch=True,
warmup_iters=1, r_warmup_iters=99, first_batch_running_var=True)`` trains like a float64 model of
that layer written from the paper's formulas and the published layer's schedule, from a
published-format state dict on."""
from __future__ import annotations

import pytest
import torch

from mabn import MABN2d

GROUP = 2  # the published layer normalizes pairs of consecutive samples
WINDOW = 16  # real_B / B = 32 / 2 groups
EPS, MOMENTUM, R_MAX, R_FROM = 1e-5, 0.98, 5.0, 100


class PublishedImageNetMABN:
    """Float64. Per forward of 2 * WINDOW samples, each pair k of the forward:

    * ``chi_k`` = mean of ``x ** 2`` over the pair; the statistic used is the mean of the WINDOW
      pair values ending at pair k (the previous forward's pairs fill the window), except at
      iteration 1, where each pair uses its own;
    * ``r = sqrt(chi + eps) / sqrt(running_var + eps)``, 1 before iteration R_FROM, else clamped
      to [1/R_MAX, R_MAX];
    * ``running_var`` is the first iteration's mean statistic, then an EMA (MOMENTUM on the old);
    * backward ``psi_k`` = mean of ``g * z`` over the pair, averaged like ``chi``;
      ``dx = (g - z * psi) / sqrt(chi + eps)`` with ``g = dy * weight * r``.
    """

    def __init__(self, state: dict):
        self.weight = state["weight"].double().clone()
        self.bias = state["bias"].double().clone()
        self.running_var = state["running_var"].double().clone()
        self.pre_x2 = state["pre_x2"].double().clone()
        self.pre_gz = state["pre_gz"].double().clone()
        self.iters = int(state["iters"].item())

    @staticmethod
    def _moving(previous, current, first):
        if first:
            return current
        stream = torch.cat([previous, current])
        return torch.stack([stream[k + 1:k + 1 + WINDOW].mean(dim=0) for k in range(current.shape[0])])

    def step(self, x, dy):
        x, dy = x.double(), dy.double()
        self.iters += 1
        first = self.iters == 1
        n, c = x.shape[:2]
        pairs = x.view(n // GROUP, GROUP, c, -1)
        chi_own = (pairs * pairs).mean(dim=(1, 3))
        chi = self._moving(self.pre_x2, chi_own, first)
        std = (chi + EPS).sqrt()
        r = std / (self.running_var + EPS).sqrt()
        r = torch.ones_like(r) if self.iters < R_FROM else r.clamp(1 / R_MAX, R_MAX)
        z = pairs / std[:, None, :, None]
        weight, bias = self.weight[None, None, :, None], self.bias[None, None, :, None]
        y = weight * r[:, None, :, None] * z + bias
        if first:
            self.running_var = chi.mean(dim=0)
        self.running_var = MOMENTUM * self.running_var + (1 - MOMENTUM) * chi.mean(dim=0)
        self.pre_x2 = chi_own
        g = dy.view_as(pairs) * weight * r[:, None, :, None]
        psi_own = (g * z).mean(dim=(1, 3))
        psi = self._moving(self.pre_gz, psi_own, first)
        dx = (g - z * psi[:, None, :, None]) / std[:, None, :, None]
        self.pre_gz = psi_own
        dweight = (dy.view_as(pairs) * r[:, None, :, None] * z).sum(dim=(0, 1, 3))
        return y.view_as(x), dx.view_as(x), dweight, dy.sum(dim=(0, 2, 3))


def _published_state(channels: int, iters: int, generator: torch.Generator) -> dict:
    """A state dict in the published ImageNet layer's format."""
    state = {
        "weight": torch.rand(channels, generator=generator) + 0.5,
        "bias": torch.rand(channels, generator=generator) - 0.5,
        "running_var": torch.rand(channels, generator=generator) + 0.5,
        "sta_matrix": torch.ones(WINDOW, 2 * WINDOW) / WINDOW,
        "pre_x2": torch.rand(WINDOW, channels, generator=generator) + 0.5,
        "pre_gz": torch.randn(WINDOW, channels, generator=generator) * 0.1,
        "iters": torch.tensor([float(iters)]),
    }
    if iters == 0:  # a fresh published layer
        state.update(running_var=torch.ones(channels), pre_x2=torch.ones(WINDOW, channels),
                     pre_gz=torch.zeros(WINDOW, channels))
    return state


@pytest.mark.parametrize("start", [0, 93], ids=["fresh", "before-r-switch"])
def test_published_imagenet_schedule_matches_the_published_layer(start):
    channels, steps = 3, 10
    generator = torch.Generator().manual_seed(start)
    state = _published_state(channels, start, generator)
    layer = MABN2d(channels, B=2, real_B=32, split_batch=True, warmup_iters=1, r_warmup_iters=R_FROM - 1,
                   first_batch_running_var=True).double()
    layer.load_state_dict(state)
    reference = PublishedImageNetMABN(state)
    for step in range(steps):
        scale = 3.0 if step % 3 == 2 else 1.0  # jumps that move r away from 1
        x = (torch.randn(2 * WINDOW, channels, 2, 2, generator=generator, dtype=torch.float64) * scale
             ).requires_grad_()
        dy = torch.randn(2 * WINDOW, channels, 2, 2, generator=generator, dtype=torch.float64)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dw_ref, db_ref = reference.step(x.detach(), dy)
        where = f"iteration {start + step + 1}"
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=where)
        torch.testing.assert_close(x.grad, dx_ref, rtol=1e-9, atol=1e-12, msg=where)
        torch.testing.assert_close(layer.weight.grad, dw_ref, rtol=1e-10, atol=1e-12, msg=where)
        torch.testing.assert_close(layer.bias.grad, db_ref, rtol=1e-10, atol=1e-12, msg=where)
        torch.testing.assert_close(layer.running_var, reference.running_var, rtol=1e-10, atol=0, msg=where)
    assert int(layer.num_batches_tracked) == start + steps


def test_the_schedule_flags_matter():
    """The default schedule differs from the published one at iteration 1 and after 100."""
    generator = torch.Generator().manual_seed(0)
    state = _published_state(3, 0, generator)
    layer = MABN2d(3, B=2, real_B=32, split_batch=True).double()
    layer.load_state_dict(state)
    reference = PublishedImageNetMABN(state)
    x = torch.randn(2 * WINDOW, 3, 2, 2, generator=generator, dtype=torch.float64) * 3
    layer(x.requires_grad_()).backward(torch.ones_like(x))
    reference.step(x.detach(), torch.ones_like(x))
    assert not torch.allclose(layer.running_var, reference.running_var)


def test_first_batch_running_var_is_in_the_repr_and_keeps_the_state_format():
    layer = MABN2d(4, first_batch_running_var=True)
    assert "first_batch_running_var=True" in repr(layer)
    assert set(layer.state_dict()) == set(MABN2d(4).state_dict())
