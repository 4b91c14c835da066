"""MABN under loss scaling: the windows hold unscaled ``psi`` whatever the scale, and a step the
GradScaler skips leaves nothing in any window."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mabn

SHAPE = (4, 3, 5, 5)


def _model(split: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        mabn.MABN2d(3, B=2, real_B=8, warmup_iters=2, r_warmup_iters=3, split_batch=split),
        nn.Conv2d(3, 3, 3, padding=1),
        mabn.MABN2d(3, B=2, real_B=8, warmup_iters=2, r_warmup_iters=3, split_batch=split),
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return model


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)


def _state(model: nn.Module):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _scales():
    """2 ** k, with k changing mid-run (as a GradScaler's scale does)."""
    return [2.0 ** k for k in (16, 16, 16, 15, 15, 3, 3, 3, 20, 20, 20, 20)]


@pytest.mark.parametrize("split", [False, True], ids=["one-group", "split"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_scaled_loss_gives_the_same_windows_statistics_and_unscaled_gradients(split, as_tensor):
    plain, scaled = _model(split), _model(split)
    for step, scale in enumerate(_scales()):
        x, target = _batch(step)
        plain.zero_grad()
        ((plain(x) - target) ** 2).mean().backward()
        mabn.set_grad_scale(scaled, torch.tensor(scale) if as_tensor else scale)
        scaled.zero_grad()
        x_scaled = x.clone().requires_grad_()
        (((scaled(x_scaled) - target) ** 2).mean() * scale).backward()
        for (name, p_plain), p_scaled in zip(plain.named_parameters(), scaled.parameters()):
            assert torch.equal(p_scaled.grad / scale, p_plain.grad), f"step {step}: {name}.grad"
        for name, value in plain.state_dict().items():
            assert torch.equal(scaled.state_dict()[name], value), f"step {step}: {name}"


def test_without_the_scale_the_windows_mix_scales():
    """The comparison above can fail: the same run without set_grad_scale differs."""
    plain, scaled = _model(False), _model(False)
    for step, scale in enumerate(_scales()[:4]):
        x, target = _batch(step)
        ((plain(x) - target) ** 2).mean().backward()
        (((scaled(x) - target) ** 2).mean() * scale).backward()
    assert not torch.allclose(scaled[0].buffer_gz, plain[0].buffer_gz)


def test_set_grad_scale_none_and_one_mean_unscaled():
    model = _model(False)
    mabn.set_grad_scale(model, 8.0)
    assert float(model[0].grad_scale) == 8.0
    mabn.set_grad_scale(model, 1.0)
    assert model[0].grad_scale is None and model[2].grad_scale is None
    mabn.set_grad_scale(model, torch.tensor(4.0))
    mabn.set_grad_scale(model, None)
    assert model[0].grad_scale is None


def _overflowing_step(model: nn.Module, parameter: nn.Parameter, step: int, overflow: bool):
    """A loss whose MABN part has finite gradients; ``parameter``'s gradient overflows float32
    at a scale of 2 ** 100 when ``overflow``."""
    x, target = _batch(step)
    return ((model(x) - target) ** 2).mean() + parameter.sum() * (1e30 if overflow else 1.0)


def test_a_step_the_scaler_skips_leaves_the_windows_as_they_were():
    model = _model(False)
    extra = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, growth_interval=1000)
    sync = mabn.GradScaleSync(model)
    for step in range(3):  # a finite step first, so the windows are not all zero
        optimizer.zero_grad()
        sync.before_forward(scaler)
        loss = _overflowing_step(model, extra, step, overflow=step == 2)
        windows = [model[0].buffer_gz.clone(), model[2].buffer_gz.clone()]
        scaler.scale(loss).backward()
        after_backward = [model[0].buffer_gz.clone(), model[2].buffer_gz.clone()]
        scaler.step(optimizer)
        scaler.update()
        sync.after_update(scaler)
        if step < 2:
            assert not torch.equal(model[0].buffer_gz, windows[0]), "a finite step adds psi to the window"
    assert not torch.isfinite(extra.grad).all(), "the last step must overflow"
    assert not torch.equal(after_backward[1], windows[1]), "the backward put psi into the window"
    assert torch.equal(model[0].buffer_gz, windows[0]) and torch.equal(model[2].buffer_gz, windows[1])
    assert scaler.get_scale() == 2.0 ** 99


def test_a_scaler_whose_scale_changes_matches_the_unscaled_run():
    """Powers of two: scaled gradients and the windows are exact."""
    plain, scaled = _model(True), _model(True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    sync = mabn.GradScaleSync(scaled)
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.01)
    scaled_optimizer = torch.optim.SGD(scaled.parameters(), lr=0.01)
    scales = set()
    for step in range(7):
        x, target = _batch(step)
        plain_optimizer.zero_grad()
        ((plain(x) - target) ** 2).mean().backward()
        plain_optimizer.step()
        scaled_optimizer.zero_grad()
        sync.before_forward(scaler)
        scaler.scale(((scaled(x) - target) ** 2).mean()).backward()
        scales.add(scaler.get_scale())
        scaler.step(scaled_optimizer)
        scaler.update()
        sync.after_update(scaler)
    assert len(scales) >= 3, "the scale must change during the run"
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(scaled.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_a_disabled_scaler_changes_nothing():
    model = _model(False)
    sync = mabn.GradScaleSync(model)
    sync.before_forward(torch.amp.GradScaler("cpu", enabled=False))
    sync.before_forward(None)
    assert model[0].grad_scale is None
    sync.after_update(None)
