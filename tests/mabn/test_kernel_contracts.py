"""Every norm layer calls torch's batch-norm kernels only with arguments that the CUDA kernels
accept (``bn_kernel_contract``), trains on channels_last input, and gives there what it gives on
contiguous input."""
from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch
from torch import nn

import mabn
from bn_kernel_contract import BatchNormContract, contract_violations

CHANNELS = 6
STEPS = 4  # MABN below switches to moving averages and r at step 2: every branch runs

LAYERS: Dict[str, Callable[[], nn.Module]] = {
    "MABN": lambda: mabn.MABN2d(CHANNELS, B=2, real_B=4, warmup_iters=1, r_warmup_iters=2),
    "MABN split": lambda: mabn.MABN2d(CHANNELS, B=2, real_B=4, warmup_iters=1, r_warmup_iters=2, split_batch=True),
    "BRN": lambda: mabn.BatchRenorm2d(CHANNELS, warmup_steps=1, r_ramp_end=2, d_ramp_end=2),
    "BRN B=2": lambda: mabn.BatchRenorm2d(CHANNELS, warmup_steps=1, r_ramp_end=2, d_ramp_end=2, B=2),
    "ghost BN": lambda: mabn.GhostBatchNorm2d(CHANNELS, B=2),
    "ghost BN one group": lambda: mabn.GhostBatchNorm2d(CHANNELS, B=4),
    "ghost BN no affine": lambda: mabn.GhostBatchNorm2d(CHANNELS, B=2, affine=False),
    "SyncBN": lambda: mabn.SyncBatchNorm(CHANNELS),
    "BN": lambda: nn.BatchNorm2d(CHANNELS),
    "GN": lambda: nn.GroupNorm(2, CHANNELS),
    "FrozenBN": lambda: mabn.FrozenBatchNorm2d(CHANNELS),
}
BATCH_NORM_KERNEL_USERS = {"MABN", "MABN split", "BRN", "BRN B=2", "ghost BN", "ghost BN one group",
                           "ghost BN no affine", "SyncBN", "BN"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(dtype: torch.dtype, channels_last: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, CHANNELS, 5, 5, generator=generator) * 2 + 0.5
    grad = torch.randn(4, CHANNELS, 5, 5, generator=generator)
    if channels_last:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    return x.to(dtype), grad.to(dtype)


def _train(layer: nn.Module, dtype: torch.dtype, channels_last: bool):
    """STEPS training forwards and backwards, then one eval forward; returns what they produced."""
    results = []
    layer.train()
    for step in range(STEPS):
        x, grad = _inputs(dtype, channels_last, seed=step)
        x.requires_grad_(True)
        y = layer(x)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    layer.eval()
    with torch.no_grad():
        results.append((layer(_inputs(dtype, channels_last, seed=STEPS)[0]), None))
    return results


def _layer(name: str, parameter_dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layer = LAYERS[name]().to(parameter_dtype)
    with torch.no_grad():  # weights away from 1 and biases away from 0: every product matters
        for parameter in layer.parameters():
            parameter.add_(torch.rand(parameter.shape).to(parameter_dtype) * 0.5)
    return layer


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(LAYERS))
def test_batch_norm_kernel_calls_keep_the_cuda_contract(name, dtype, channels_last):
    """Inputs in float32 and, as under autocast, float16/bfloat16 with float32 parameters."""
    layer = _layer(name)
    with BatchNormContract() as contract:
        _train(layer, dtype, channels_last)
    assert contract.violations == []
    if name in BATCH_NORM_KERNEL_USERS:
        assert contract.calls, "the layer should reach torch's batch-norm kernels"


@pytest.mark.parametrize("name", sorted(BATCH_NORM_KERNEL_USERS))
def test_contract_holds_for_half_precision_models(name):
    """A model converted to float16 as a whole: parameters and buffers in float16 too."""
    layer = _layer(name, torch.float16)
    assert contract_violations(lambda: _train(layer, torch.float16, channels_last=True)) == []


@pytest.mark.parametrize("name", list(LAYERS))
def test_channels_last_training_matches_contiguous(name):
    contiguous, channels_last = _layer(name), _layer(name)
    expected = _train(contiguous, torch.float32, channels_last=False)
    got = _train(channels_last, torch.float32, channels_last=True)
    for (y, grad), (y_cl, grad_cl) in zip(expected, got):
        torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)
        if grad is not None:
            torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-5)
    for (key, value), value_cl in zip(contiguous.state_dict().items(), channels_last.state_dict().values()):
        torch.testing.assert_close(value_cl, value, rtol=1e-4, atol=1e-6, msg=f"buffer {key}")
    for parameter, parameter_cl in zip(contiguous.parameters(), channels_last.parameters()):
        torch.testing.assert_close(parameter_cl.grad, parameter.grad, rtol=1e-4, atol=1e-5)


def test_the_contract_check_catches_each_known_violation():
    x = torch.randn(2, 3, 4, 4)
    zeros, ones = torch.zeros(3), torch.ones(3)
    backward = torch.ops.aten.native_batch_norm_backward

    calls = [
        lambda: backward(x, x, None, None, None, zeros, ones, True, 0.0, [False, True, False]),  # no weight
        lambda: backward(x, x, ones, zeros, ones, None, None, False, 1e-5, [True, False, False]),  # no save_*
        lambda: backward(x, x, ones, None, None, zeros.double(), ones.double(), True, 0.0, [True, True, True]),
        lambda: backward(x.half(), x.half(), ones.half(), None, None, zeros.half(), ones.half(), True, 0.0,
                         [True, True, True]),  # half save_mean: CUDA reads float32
        lambda: torch.native_batch_norm(x, ones.double(), zeros, zeros, ones, False, 0.0, 1e-5),
    ]

    def run_all():
        for call in calls:
            try:
                call()
            except RuntimeError:  # the CPU kernel refuses some of them too; the check ran first
                pass

    violations = contract_violations(run_all)
    assert any("weight undefined" in v for v in violations)
    assert any("save_mean/save_invstd undefined" in v for v in violations)
    assert any("save_mean in torch.float64" in v for v in violations)
    assert any("save_mean in torch.float16" in v for v in violations)
    assert any("native_batch_norm: parameters in several dtypes" in v for v in violations)
