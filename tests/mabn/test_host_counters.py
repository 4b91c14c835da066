import copy

import pytest
import torch

from mabn import MABN2d
from mabn.host_counters import HostCounters


class _Unknown(HostCounters):
    """Never knows the counters: the layer takes the tensor logic of a device it cannot read."""

    def known(self, tensors):
        return None


def _twins(**kwargs):
    """Two identical layers; the second decides its schedule with tensor logic on the buffers."""
    torch.manual_seed(0)
    host = MABN2d(3, **kwargs)
    with torch.no_grad():
        host.weight.uniform_(0.5, 1.5)
        host.bias.uniform_(-0.5, 0.5)
    device = copy.deepcopy(host)
    device.host_counters = _Unknown()
    return host, device


def _step(layer, x, dy):
    x = x.clone().requires_grad_()
    layer.weight.grad = layer.bias.grad = None
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.weight.grad, layer.bias.grad


def _assert_same_state(a, b):
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


SCHEDULES = [
    pytest.param(dict(B=2, real_B=8, warmup_iters=3, r_warmup_iters=5, r_max=1.2), 2, id="one-group"),
    pytest.param(dict(B=2, real_B=8, warmup_iters=1, r_warmup_iters=4, r_max=1.2, split_batch=True), 6,
                 id="split-mixed-own-groups"),
    pytest.param(dict(B=1, real_B=4, warmup_iters=4, r_warmup_iters=0, split_batch=True,
                      first_batch_running_var=True), 2, id="split-first-batch-var"),
    pytest.param(dict(B=2, real_B=4, warmup_iters=0, r_warmup_iters=2, first_batch_running_var=True), 2,
                 id="one-group-first-batch-var"),
]


@pytest.mark.parametrize("kwargs,batch", SCHEDULES)
def test_host_schedule_matches_device_schedule_bit_exactly(kwargs, batch):
    host, device = _twins(**kwargs)
    for it in range(12):
        scale = 4.0 if it % 3 == 0 else 0.5  # moves r out of [1/r_max, r_max]
        x, dy = torch.randn(batch, 3, 4, 4) * scale, torch.randn(batch, 3, 4, 4)
        for a, b in zip(_step(host, x, dy), _step(device, x, dy)):
            assert torch.equal(a, b), it
        _assert_same_state(host, device)


def test_counters_changed_outside_the_layer_are_read_again():
    host, device = _twins(B=2, real_B=8, warmup_iters=1, r_warmup_iters=3)
    x, dy = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for _ in range(5):
        _step(host, x, dy)
        _step(device, x, dy)
    for layer in (host, device):
        layer.num_batches_tracked.zero_()
        layer.groups_seen.fill_(1)
    for _ in range(4):
        for a, b in zip(_step(host, x, dy), _step(device, x, dy)):
            assert torch.equal(a, b)
    _assert_same_state(host, device)
    assert int(host.num_batches_tracked) == 4 and int(host.groups_seen) == 5


def test_load_state_dict_deepcopy_and_moves_keep_the_schedule():
    source, _ = _twins(B=2, real_B=4, warmup_iters=2, r_warmup_iters=3)
    x, dy = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for _ in range(4):
        _step(source, x, dy)
    loaded = MABN2d(3, B=2, real_B=4, warmup_iters=2, r_warmup_iters=3)
    _step(loaded, x, dy)  # a position of its own, replaced by the load
    loaded.load_state_dict(source.state_dict())
    copied = copy.deepcopy(source).to(torch.float64).to(torch.float32)
    for _ in range(3):
        expected = _step(source, x, dy)
        for other in (loaded, copied):
            for a, b in zip(_step(other, x, dy), expected):
                assert torch.equal(a, b)
    _assert_same_state(loaded, source)
    _assert_same_state(copied, source)


def test_known_values_follow_the_tensor_versions():
    counters = HostCounters()
    a, b = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    counters.record((a, b), (0, 0))
    assert counters.known((a, b)) == (0, 0)
    torch._foreach_add_([a, b], [1, 2])
    assert counters.known((a, b)) == (1, 2)  # read again on the CPU
    replacement = torch.full((), 7, dtype=torch.long)
    assert counters.known((replacement, b)) == (7, 2)


def test_unknown_values_on_a_device_that_cannot_be_read_give_none():
    counters = HostCounters()
    meta = (torch.zeros((), dtype=torch.long, device="meta"),) * 2
    assert counters.known(meta) is None
    counters.record(meta, (3, 4))
    assert counters.known(meta) == (3, 4)
    meta[0].add_(1)
    assert counters.known(meta) is None
