"""The norm layers on a CUDA device: kernels against a float64 CPU reference, mixed precision,
``torch.compile`` and torch's NCCL SyncBN path.

* every norm layer of the package (and ``nn.GroupNorm``, torchvision's ``FrozenBatchNorm2d``),
  stepped several training forwards/backwards on the device, on contiguous and channels_last
  input, against a float64 CPU copy of the same layer stepped identically;
* a MABN + CenConv ResNet block under float16 autocast with ``GradScaler`` (and
  ``mabn.GradScaleSync``) and under bfloat16 autocast, against a float32 run;
* ``torch.compile`` (inductor) of a small MABN network: one graph, equal to eager;
* ``mabn.SyncBatchNorm`` and torch's fused CUDA SyncBN function under an NCCL process group of
  world size 1, against ``nn.BatchNorm2d``.

Run with ``python -m pytest -m cuda`` on a GPU machine. ``MABN_CUDA_TESTS_DEVICE=cpu python -m
pytest -m cuda tests/mabn/test_cuda_norms.py`` runs the device-agnostic tests on the CPU (to check
the test code); the float16/GradScaler and NCCL tests need CUDA itself and are skipped there.
"""
from __future__ import annotations

import contextlib
import copy
import socket
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

import mabn

pytestmark = pytest.mark.cuda

CHANNELS = 8
SHAPE = (4, CHANNELS, 5, 5)
STEPS = 5
RTOL = 1e-4
ATOL = 1e-5

Record = Dict[str, Tensor]

# Each case builds a layer in float32 on the CPU. The schedules are short (warm-ups of one
# step, windows of 2-3 groups) so that the moving-average, renormalization and clamping paths
# are all live within STEPS training steps.
NORM_CASES: Dict[str, Callable[[], nn.Module]] = {
    "mabn-one-group": lambda: mabn.MABN2d(CHANNELS, B=2, real_B=6, warmup_iters=1, r_warmup_iters=1, r_max=1.5),
    "mabn-split-B2": lambda: mabn.MABN2d(CHANNELS, B=2, real_B=4, warmup_iters=1, split_batch=True,
                                         r_warmup_iters=1, r_max=1.5),
    "brn": lambda: mabn.BatchRenorm2d(CHANNELS, momentum=0.1, warmup_steps=1, r_ramp_end=2, d_ramp_end=3,
                                      r_max=1.5, d_max=0.5),
    "brn-B2": lambda: mabn.BatchRenorm2d(CHANNELS, momentum=0.1, warmup_steps=1, r_ramp_end=2, d_ramp_end=3,
                                         r_max=1.5, d_max=0.5, B=2),
    "ghost-bn-B2": lambda: mabn.GhostBatchNorm2d(CHANNELS, 2),
    "syncbn": lambda: mabn.get_norm("SyncBN", CHANNELS),
    "groupnorm": lambda: mabn.get_norm("GN", CHANNELS, num_groups=4),
    "frozen-bn": lambda: mabn.get_norm("FrozenBN", CHANNELS),
}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture()
def dynamo_reset() -> Iterator[None]:
    """A clean ``torch._dynamo`` state before the test, and none of its graphs left after it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture()
def no_tf32() -> Iterator[None]:
    """Convolutions and matmuls in full float32 on CUDA during the test (TF32 keeps 10 bits);
    the flags are restored afterwards (the matmul flag also in its newer per-backend spelling)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    saved_precision = getattr(matmul, "fp32_precision", None)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
        if saved_precision is not None:
            matmul.fp32_precision = saved_precision


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build_norm(case: str) -> nn.Module:
    """The layer of ``case`` with random affine parameters (and, for FrozenBN, random statistics)."""
    layer = NORM_CASES[case]()
    gen = _generator(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        layer.bias.copy_(torch.rand(CHANNELS, generator=gen) - 0.5)
        if isinstance(layer, mabn.FrozenBatchNorm2d):
            layer.running_mean.copy_(torch.randn(CHANNELS, generator=gen) * 0.5)
            layer.running_var.copy_(torch.rand(CHANNELS, generator=gen) * 2 + 0.25)
    return layer


def _norm_inputs() -> List[Tuple[Tensor, Tensor]]:
    """(input, upstream gradient) per step, float32 on the CPU: channels of different scales and
    offsets, and an overall level that changes from step to step so that MABN's ``r`` and Batch
    Renorm's ``r``/``d`` move (and clamp)."""
    gen = _generator(0)
    scale = torch.linspace(0.3, 3.0, CHANNELS).view(1, -1, 1, 1)
    offset = torch.linspace(-1.0, 1.0, CHANNELS).view(1, -1, 1, 1)
    levels = (1.0, 3.0, 0.5, 2.0, 1.0)
    return [(torch.randn(SHAPE, generator=gen) * scale * levels[step] + offset, torch.randn(SHAPE, generator=gen))
            for step in range(STEPS)]


def _step_norm(layer: nn.Module, inputs: List[Tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype,
               memory_format: torch.memory_format) -> List[Record]:
    """Train ``layer`` one forward/backward per input; per step its output, the gradients and
    every buffer after the step."""
    layer.train()
    records = []
    for x_cpu, dy_cpu in inputs:
        x = x_cpu.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
        dy = dy_cpu.to(device, dtype).contiguous(memory_format=memory_format)
        for parameter in layer.parameters():
            parameter.grad = None
        y = layer(x)
        y.backward(dy)
        record = {"output": y.detach(), "input grad": x.grad}
        record.update({f"{name} grad": p.grad for name, p in layer.named_parameters()})
        record.update({f"buffer {name}": b.detach().clone() for name, b in layer.named_buffers()})
        records.append(record)
    return records


def _assert_close(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Equality for integer tensors; otherwise relative, with ``atol`` scaled to the magnitude
    of ``expected`` (a sum over the batch is larger than one element)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    expected = expected.double()
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * max(1.0, magnitude),
                               msg=lambda message: f"{what}: {message}")


def _assert_records_close(actual: List[Record], expected: List[Record], rtol: float = RTOL) -> None:
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert got.keys() == want.keys()
        for key in want:
            _assert_close(got[key], want[key], f"step {step + 1}, {key}", rtol=rtol)


@pytest.mark.parametrize("memory_format", list(MEMORY_FORMATS))
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_norm_matches_float64_cpu_reference(case: str, memory_format: str, cuda_device: torch.device) -> None:
    """Outputs, gradients and buffers of every training step equal a float64 CPU copy's."""
    layer = _build_norm(case)
    inputs = _norm_inputs()
    expected = _step_norm(copy.deepcopy(layer).double(), inputs, torch.device("cpu"), torch.float64,
                          torch.contiguous_format)
    actual = _step_norm(copy.deepcopy(layer).to(cuda_device), inputs, cuda_device, torch.float32,
                        MEMORY_FORMATS[memory_format])
    _assert_records_close(actual, expected)
    if memory_format == "channels_last":
        contiguous = _step_norm(copy.deepcopy(layer).to(cuda_device), inputs, cuda_device, torch.float32,
                                torch.contiguous_format)
        _assert_records_close(actual, contiguous)


# Mixed precision through a ResNet block.

BLOCK_SHAPE = (8, CHANNELS, 8, 8)
BLOCK_CLASSES = 4
AMP_STEPS = 10


def _mabn_block(device: torch.device) -> nn.Module:
    """A torchvision BasicBlock with MABN and CenConv, pooled into a linear classifier."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = BasicBlock(CHANNELS, CHANNELS)
        block = mabn.convert_norm(block, "MABN", B=2, real_B=8, warmup_iters=1, r_warmup_iters=2)
        block = mabn.convert_conv(block, "CenConv")
        head = nn.Linear(CHANNELS, BLOCK_CLASSES)
    return nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).to(device)


def _block_batches(device: torch.device) -> List[Tuple[Tensor, Tensor]]:
    gen = _generator(2)
    return [(torch.randn(BLOCK_SHAPE, generator=gen).to(device),
             torch.randint(0, BLOCK_CLASSES, (BLOCK_SHAPE[0],), generator=gen).to(device))
            for _ in range(AMP_STEPS)]


def _train_block(model: nn.Module, batches: List[Tuple[Tensor, Tensor]], device: torch.device,
                 autocast_dtype: Optional[torch.dtype] = None,
                 scaler: Optional[torch.amp.GradScaler] = None) -> Tuple[List[float], List[Record]]:
    """SGD steps on ``batches``, under autocast when ``autocast_dtype`` is given and through
    ``scaler`` (with ``mabn.GradScaleSync``) when given. Returns the losses and, per step, the
    gradients the optimizer applied (unscaled). Every loss and every gradient must be finite."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = mabn.GradScaleSync(model) if scaler is not None else None
    losses, grads = [], []
    for step, (x, target) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        if sync is not None:
            sync.before_forward(scaler)
        autocast = (contextlib.nullcontext() if autocast_dtype is None
                    else torch.autocast(device.type, dtype=autocast_dtype))
        with autocast:
            loss = nn.functional.cross_entropy(model(x), target)
        assert torch.isfinite(loss), f"step {step + 1}: loss {loss.item()}"
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
        for name, parameter in model.named_parameters():
            assert torch.isfinite(parameter.grad).all(), f"step {step + 1}: non-finite gradient of {name}"
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # unscales the gradients in place first
            scaler.update()
            sync.after_update(scaler)
        losses.append(loss.item())
        grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
    return losses, grads


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    expected = expected.detach().double()
    return float((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-12))


def _assert_training_close(model: nn.Module, run: Tuple[List[float], List[Record]], reference: nn.Module,
                           reference_run: Tuple[List[float], List[Record]], initial: nn.Module, tolerance: float,
                           grad_tolerance: float) -> None:
    """Losses and each step's gradients close to the reference run's (relative to the norm of
    each gradient, within ``grad_tolerance``); every parameter's change over the run and every
    floating-point buffer within ``tolerance`` of the reference's (relative to its norm), the
    counters equal."""
    (losses, grads), (reference_losses, reference_grads) = run, reference_run
    assert losses == pytest.approx(reference_losses, rel=tolerance)
    for step, (got, want) in enumerate(zip(grads, reference_grads)):
        for name in want:
            error = _relative_error(got[name], want[name])
            assert error < grad_tolerance, f"step {step + 1}: {name} grad differs from float32's by {error:.3g}"
    for (name, p), p_ref, p_0 in zip(model.named_parameters(), reference.parameters(), initial.parameters()):
        error = _relative_error(p - p_0, p_ref - p_0)
        assert error < tolerance, f"{name}: its change differs from float32's by {error:.3g} (relative)"
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers()):
        if b.is_floating_point():
            error = _relative_error(b, b_ref)
            assert error < tolerance, f"buffer {name} differs from float32's by {error:.3g} (relative)"
        else:
            assert torch.equal(b, b_ref), name


@pytest.mark.usefixtures("no_tf32")
def test_float16_autocast_with_grad_scaler_matches_float32(real_cuda_device: torch.device) -> None:
    """Float16 autocast with loss scaling, the scale doubling every 2 steps (so that
    ``GradScaleSync`` has scale changes to follow), against the same steps in float32."""
    device = real_cuda_device
    batches = _block_batches(device)
    initial = _mabn_block(device)
    reference = copy.deepcopy(initial)
    reference_run = _train_block(reference, batches, device)
    model = copy.deepcopy(initial)
    init_scale = 2.0 ** 10
    scaler = torch.amp.GradScaler("cuda", init_scale=init_scale, growth_interval=2)
    run = _train_block(model, batches, device, torch.float16, scaler)
    # Five growths and no halving: no step was skipped for an overflow, so both runs took the same steps.
    assert scaler.get_scale() == init_scale * 2 ** (AMP_STEPS // 2)
    # A backward window that mixed two loss scales would put single gradients up to 36% off
    # (measured with float16 autocast on the CPU); float16 itself stays below 3%.
    _assert_training_close(model, run, reference, reference_run, initial, tolerance=5e-2, grad_tolerance=1e-1)


@pytest.mark.usefixtures("no_tf32")
def test_bfloat16_autocast_matches_float32(cuda_device: torch.device) -> None:
    """Bfloat16 autocast (statistics in float32 inside the norms) against float32."""
    batches = _block_batches(cuda_device)
    initial = _mabn_block(cuda_device)
    reference = copy.deepcopy(initial)
    reference_run = _train_block(reference, batches, cuda_device)
    model = copy.deepcopy(initial)
    run = _train_block(model, batches, cuda_device, torch.bfloat16)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
    # bfloat16 keeps 8 bits: up to ~10% on single gradients (measured on the CPU), ~6% over the run.
    _assert_training_close(model, run, reference, reference_run, initial, tolerance=0.15, grad_tolerance=0.25)


# torch.compile.

def _compile_net(device: torch.device) -> nn.Module:
    """CenConv2d -> MABN2d (groups of 2) -> ReLU -> CenConv2d -> MABN2d (one group) -> ReLU -> conv."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            mabn.CenConv2d(3, CHANNELS, 3, padding=1, bias=False),
            mabn.MABN2d(CHANNELS, 2, 4, warmup_iters=1, split_batch=True, r_warmup_iters=1),
            nn.ReLU(),
            mabn.CenConv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False),
            mabn.MABN2d(CHANNELS, 2, 4, warmup_iters=1, r_warmup_iters=1),
            nn.ReLU(),
            nn.Conv2d(CHANNELS, 4, 1),
        )
    return net.to(device)


@pytest.mark.usefixtures("no_tf32", "dynamo_reset")
def test_torch_compile_is_one_graph_equal_to_eager(cuda_device: torch.device) -> None:
    """Three training steps (across the warm-up and ``r`` switches) compile into exactly one
    inductor graph; outputs, gradients and buffers equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    eager = _compile_net(cuda_device)
    compiled_net = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_net, backend=counter)
    gen = _generator(3)
    for step in range(3):
        x = (torch.randn(4, 3, 8, 8, generator=gen) * (step + 1)).to(cuda_device)
        outputs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            y = model(x)
            y.square().mean().backward()
            outputs.append(y.detach())
        _assert_close(outputs[1], outputs[0], f"step {step + 1}, output")
        for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_net.parameters()):
            _assert_close(p_compiled.grad, p_eager.grad, f"step {step + 1}, {name} grad")
        for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_net.buffers()):
            _assert_close(b_compiled, b_eager, f"step {step + 1}, buffer {name}")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled (a graph break or a recompile)"


# NCCL.

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def nccl_group(real_cuda_device: torch.device) -> Iterator[None]:
    """An NCCL process group of world size 1 for the test, destroyed afterwards."""
    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    assert not dist.is_initialized(), "a process group is already initialized (left over by another test?)"
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_syncbn_under_nccl_matches_batchnorm(real_cuda_device: torch.device, nccl_group: None) -> None:
    """With an NCCL group of one process, ``get_norm("SyncBN")`` and torch's fused CUDA SyncBN
    function (what the layer calls with several processes) train like ``nn.BatchNorm2d``."""
    device = real_cuda_device
    gen = _generator(4)
    x = (torch.randn(SHAPE, generator=gen) * 2 + 0.5).to(device)
    dy = torch.randn(SHAPE, generator=gen).to(device)
    reference = nn.BatchNorm2d(CHANNELS).to(device)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        reference.bias.copy_(torch.rand(CHANNELS, generator=gen) - 0.5)
    sync = mabn.get_norm("SyncBN", CHANNELS).to(device)
    sync.load_state_dict(reference.state_dict())
    fused = copy.deepcopy(reference)

    def forward_backward(run: Callable[[Tensor], Tensor], module: nn.Module) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(dy)
        return y.detach(), xi.grad, module.weight.grad, module.bias.grad

    expected = forward_backward(reference, reference)
    group = dist.group.WORLD
    results = {
        "mabn.SyncBatchNorm": forward_backward(sync, sync),
        "torch's fused SyncBN": forward_backward(
            lambda xi: torch.nn.modules._functions.SyncBatchNorm.apply(
                xi, fused.weight, fused.bias, fused.running_mean, fused.running_var, fused.eps, fused.momentum,
                group, dist.get_world_size(group)), fused),
    }
    names = ("output", "input grad", "weight grad", "bias grad")
    for path, got in results.items():
        for name, actual, want in zip(names, got, expected):
            _assert_close(actual, want, f"{path}, {name}")
    for path, module in (("mabn.SyncBatchNorm", sync), ("torch's fused SyncBN", fused)):
        _assert_close(module.running_mean, reference.running_mean, f"{path}, running_mean")
        _assert_close(module.running_var, reference.running_var, f"{path}, running_var")
    assert int(sync.num_batches_tracked) == 1 and int(sync.skipped_updates) == 0
