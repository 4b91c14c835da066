"""MABN with non-finite and empty inputs: bad statistics never enter the running statistics."""
import pytest
import torch

from mabn import MABN1d, MABN2d


def _trained(split=False, channels=3, steps=4):
    torch.manual_seed(0)
    layer = MABN2d(channels, 2, 4, warmup_iters=1, split_batch=split, r_warmup_iters=2)
    for _ in range(steps):
        x = torch.randn(4 if split else 2, channels, 3, 3, requires_grad=True)
        layer(x).backward(torch.randn_like(x))
    return layer


def _state(layer):
    """Parameters and buffers as the layer holds them (windows of split_batch=False layers are rings)."""
    return {k: v.detach().clone() for k, v in [*layer.named_parameters(), *layer.named_buffers()]}


def _step(layer, x, grad=None):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y) if grad is None else grad)
    return y, x.grad


@pytest.mark.parametrize("split", [False, True])
def test_one_nan_pixel_skips_that_channel_only(split):
    layer = _trained(split)
    before = _state(layer)
    x = torch.randn(4 if split else 2, 3, 3, 3)
    x[1, 0, 2, 1] = float("nan")
    _step(layer, x)
    assert torch.equal(layer.running_var[0], before["running_var"][0])
    assert torch.equal(layer.buffer_x2[:, 0], before["buffer_x2"][:, 0])
    assert torch.equal(layer.buffer_gz[:, 0], before["buffer_gz"][:, 0])
    assert not torch.equal(layer.running_var[1:], before["running_var"][1:])
    assert not torch.equal(layer.buffer_x2[:, 1:], before["buffer_x2"][:, 1:])
    assert not torch.equal(layer.buffer_gz[:, 1:], before["buffer_gz"][:, 1:])
    for key in ("running_var", "buffer_x2", "buffer_gz"):
        assert torch.isfinite(getattr(layer, key)).all(), key
    # the forward dropped channel 0's chi (the backward drops its psi without counting)
    assert int(layer.skipped_updates) == 1
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


@pytest.mark.parametrize("value", [1e30, float("inf"), float("-inf")])
def test_overflowing_or_infinite_input_keeps_statistics_finite(value):
    layer = _trained()
    before = _state(layer)
    x = torch.randn(2, 3, 3, 3)
    x[0, 1] = value  # 1e30 ** 2 overflows float32
    _step(layer, x)
    assert torch.equal(layer.running_var[1], before["running_var"][1])
    assert torch.equal(layer.buffer_x2[:, 1], before["buffer_x2"][:, 1])
    for key in ("running_var", "buffer_x2", "buffer_gz"):
        assert torch.isfinite(getattr(layer, key)).all(), key
    assert int(layer.skipped_updates) >= 1
    layer.eval()
    assert torch.isfinite(layer(torch.randn(2, 3, 3, 3))).all()


def test_non_finite_gradient_does_not_poison_psi_window():
    layer = _trained()
    before = _state(layer)
    grad = torch.randn(2, 3, 3, 3)
    grad[0, 2, 0, 0] = float("nan")
    _step(layer, torch.randn(2, 3, 3, 3), grad)
    assert torch.equal(layer.buffer_gz[:, 2], before["buffer_gz"][:, 2])
    assert not torch.equal(layer.buffer_gz[:, :2], before["buffer_gz"][:, :2])
    assert torch.isfinite(layer.buffer_gz).all()


@pytest.mark.parametrize("layer_cls,shape", [(MABN2d, (0, 3, 4, 4)), (MABN2d, (2, 3, 0, 3)), (MABN1d, (0, 3))])
@pytest.mark.parametrize("split", [False, True])
def test_empty_batch_changes_nothing_and_backward_gives_zero_grads(layer_cls, shape, split):
    layer = layer_cls(3, 2, 4, warmup_iters=1, split_batch=split, r_warmup_iters=1)
    layer(torch.randn((2, 3) + (4,) * (len(shape) - 2))).sum().backward()
    before = _state(layer)
    layer.zero_grad()
    empty = torch.randn(shape, requires_grad=True)
    y = layer(empty)
    assert y.shape == empty.shape
    y.sum().backward()
    assert empty.grad.shape == empty.shape
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.bias.grad, torch.zeros(3))
    for key, value in _state(layer).items():
        assert torch.equal(value, before[key]), key


def test_checkpoint_without_skipped_updates_loads():
    layer = _trained()
    state = layer.state_dict()
    state.pop("skipped_updates")
    fresh = MABN2d(3, 2, 4)
    fresh.skipped_updates.fill_(7)
    fresh.load_state_dict(state)
    assert fresh.skipped_updates.dtype == torch.long and int(fresh.skipped_updates) == 0
    assert fresh.skipped_updates.dim() == 0
