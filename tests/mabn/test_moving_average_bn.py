"""MABN against a float64 reference written from the definition in docs/algorithm.md."""
import math

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from mabn import MABN1d, MABN2d, MABN3d
from op_counting import training_step_ops


class ReferenceMABN:
    """Float64, one group at a time, Python lists: the definition, not the implementation."""

    def __init__(self, weight, bias, B, real_B, eps, momentum, warmup_iters, split_batch, r_max, r_warmup_iters):
        self.weight = weight.double().clone()
        self.bias = bias.double().clone()
        self.B, self.W = B, real_B // B
        self.eps, self.momentum, self.warmup = eps, momentum, warmup_iters
        self.split, self.r_max, self.r_warmup = split_batch, r_max, r_warmup_iters
        self.running_var = torch.ones_like(self.weight)
        self.t = 0
        self.chi_stream, self.psi_stream = [], []
        self.clamped_steps = 0

    def _rule(self, stream, k):
        if self.t < self.warmup or k <= self.W:
            return stream[-1]
        return sum(stream[-self.W:]) / self.W

    def step(self, x, dy):
        x, dy = x.double(), dy.double()
        self.t += 1
        n = x.shape[0]
        group_size = self.B if self.split else n
        view = (1, -1) + (1,) * (x.dim() - 2)
        w, b = self.weight.view(view), self.bias.view(view)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        dw, db = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        reduce_dims = [0] + list(range(2, x.dim()))
        chis = []
        for start in range(0, n, group_size):
            xg, dyg = x[start:start + group_size], dy[start:start + group_size]
            self.chi_stream.append((xg * xg).mean(dim=reduce_dims))
            chi = self._rule(self.chi_stream, len(self.chi_stream))
            chis.append(chi)
            std = torch.sqrt(chi + self.eps)
            r = std / torch.sqrt(self.running_var + self.eps)
            if self.t <= self.r_warmup:
                r = torch.ones_like(r)
            else:
                if ((r > self.r_max) | (r < 1 / self.r_max)).any():
                    self.clamped_steps += 1
                r = r.clamp(1 / self.r_max, self.r_max)
            z = xg / std.view(view)
            y[start:start + group_size] = w * r.view(view) * z + b
            g = dyg * w * r.view(view)
            self.psi_stream.append((g * z).mean(dim=reduce_dims))
            psi = self._rule(self.psi_stream, len(self.psi_stream))
            dx[start:start + group_size] = (g - z * psi.view(view)) / std.view(view)
            dw += (dyg * r.view(view) * z).sum(dim=reduce_dims)
            db += dyg.sum(dim=reduce_dims)
        self.running_var = self.momentum * self.running_var + (1 - self.momentum) * torch.stack(chis).mean(0)
        return y, dx, dw, db

    def eval(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(view) * x.double() / torch.sqrt(self.running_var.view(view) + self.eps) + self.bias.view(view)


# Dispatched aten ops per training forward + backward at (N, 64, 7, 7) (the layer must stay cheap
# at small shapes, where the per-op overhead dominates), by (groups, window full): one group and
# N / B = 4 groups, while groups use their own statistics and once the window is full. Each is a
# kernel launch on a GPU; lower the numbers with every cut so that a regression fails.
# (split_batch, groups, window full): exact counts; split_batch=False layers keep ring windows,
# split ones shifting windows; (True, 4, False) includes the one-time build of the cached averaging
# matrix at the first windowed forward
OP_BUDGETS = {(False, 1, False): 25, (False, 1, True): 27, (True, 1, False): 29, (True, 1, True): 31,
              (True, 4, False): 59, (True, 4, True): 50}


def assert_close(actual, expected, rtol=1e-4):
    """Relative equality, with the absolute floor scaled to the tensor's magnitude."""
    expected = expected.double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


# (layer, input shape per forward, B, real_B, split_batch): W equal to, smaller and larger
# than the groups per forward, and the detection protocol with one group.
CASES = [
    pytest.param(MABN2d, (2, 3, 4, 4), 2, 8, False, id="2d-whole-batch-W4"),
    pytest.param(MABN2d, (8, 3, 3, 3), 2, 8, True, id="2d-split-W4-eq-groups4"),
    pytest.param(MABN2d, (4, 3, 3, 3), 2, 12, True, id="2d-split-W6-gt-groups2"),
    pytest.param(MABN1d, (6, 3, 5), 1, 4, True, id="1d-split-B1-W4-lt-groups6"),
    pytest.param(MABN3d, (2, 3, 2, 3, 3), 1, 3, True, id="3d-split-W3"),
]


@pytest.mark.parametrize("layer_cls,shape,B,real_B,split", CASES)
def test_matches_float64_reference_across_all_schedule_switches(layer_cls, shape, B, real_B, split):
    torch.manual_seed(0)
    warmup, r_warmup, r_max, iters = 30, 1000, 1.5, 1100
    layer = layer_cls(shape[1], B, real_B, 1e-5, 0.9, warmup, split_batch=split, r_max=r_max)
    assert layer.r_warmup_iters == r_warmup
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    ref = ReferenceMABN(layer.weight.detach(), layer.bias.detach(), B, real_B, 1e-5, 0.9, warmup, split, r_max, r_warmup)
    channel_scale = torch.tensor([1.0, 3.0, 0.2]).view((1, -1) + (1,) * (len(shape) - 2))
    for it in range(iters):
        # the input scale jumps every 40 iterations so that r leaves [1/r_max, r_max]
        level = 4.0 if (it // 40) % 2 else 0.5
        x = (torch.randn(shape) * channel_scale * level).requires_grad_()
        dy = torch.randn(shape)
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(dy)
        y_ref, dx_ref, dw_ref, db_ref = ref.step(x.detach(), dy)
        if it in (0, warmup - 2, warmup - 1, warmup, warmup + 1, r_warmup - 1, r_warmup, r_warmup + 1) or it % 97 == 0 or it == iters - 1:
            assert_close(y, y_ref)
            assert_close(x.grad, dx_ref)
            assert_close(layer.weight.grad, dw_ref)
            assert_close(layer.bias.grad, db_ref)
            assert_close(layer.running_var, ref.running_var)
    assert ref.clamped_steps > 10, "the test must exercise the r clamp"
    assert int(layer.num_batches_tracked) == iters
    layer.eval()
    x = torch.randn(shape)
    assert_close(layer(x), ref.eval(x))


def test_published_positional_order_and_defaults():
    layer = MABN2d(16, 2, 32)
    assert (layer.B, layer.real_B, layer.window, layer.eps, layer.momentum, layer.warmup_iters) == (2, 32, 16, 1e-5, 0.98, 100)
    assert layer.r_warmup_iters == 1000 and layer.r_max == 5.0 and not layer.split_batch
    assert isinstance(layer, _BatchNorm)
    assert layer.running_var.shape == (16,) and layer.buffer_x2.shape == (16, 16)
    assert MABN2d(4, 1, 4, 1e-3, 0.9, 2000).r_warmup_iters == 2000


def _train(layer, steps, seed, shape):
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=gen).requires_grad_()
        y = layer(x)
        y.backward(torch.randn(shape, generator=gen))
        outputs.append((y.detach(), x.grad))
    return outputs


@pytest.mark.parametrize("steps", [3, 4, 5, 6])
def test_ring_windows_are_saved_oldest_first(steps):
    """A split_batch=False layer keeps its windows as rings; its state dict holds the last W
    statistics oldest first, as a split layer's shifting window does."""
    torch.manual_seed(0)
    layer = MABN2d(3, 2, 8, warmup_iters=0, r_warmup_iters=0)  # W = 4
    inputs = [torch.randn(2, 3, 5, 5) for _ in range(steps)]
    for x in inputs:
        layer(x).sum().backward()
    chi = torch.stack([x.square().mean(dim=(0, 2, 3)) for x in inputs])
    expected = torch.cat([torch.zeros(max(0, 4 - steps), 3), chi[-4:]])
    saved = layer.state_dict()["buffer_x2"]
    torch.testing.assert_close(saved, expected)
    assert saved.data_ptr() != layer.buffer_x2.data_ptr()
    assert torch.equal(layer.buffer_x2.sort(dim=0).values, saved.sort(dim=0).values)
    reloaded = MABN2d(3, 2, 8, warmup_iters=0, r_warmup_iters=0)
    reloaded.load_state_dict(layer.state_dict())
    assert torch.equal(reloaded.buffer_x2, layer.buffer_x2) and torch.equal(reloaded.buffer_gz, layer.buffer_gz)


@pytest.mark.parametrize("split,steps", [(True, 6), (False, 6), (False, 7)])
def test_state_dict_round_trip_resumes_bit_exactly(split, steps):
    """Shifting windows (split_batch) and rings, saved where the ring starts at row 0 and elsewhere."""
    torch.manual_seed(0)
    shape = (8, 4, 3, 3)
    a = MABN2d(4, 2, 8, warmup_iters=5, split_batch=split, r_warmup_iters=8)
    _train(a, steps, 0, shape)
    b = MABN2d(4, 2, 8, warmup_iters=5, split_batch=split, r_warmup_iters=8)
    b.load_state_dict(a.state_dict())
    for (ya, ga), (yb, gb) in zip(_train(a, 10, 1, shape), _train(b, 10, 1, shape)):
        assert torch.equal(ya, yb) and torch.equal(ga, gb)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_loads_published_detection_format_and_continues_exactly():
    """Format: running_var (1,C,1,1), iters long (1,), ring buffers slot t % W."""
    torch.manual_seed(0)
    shape, C, W = (2, 4, 3, 3), 4, 4
    a = MABN2d(C, 2, 8, warmup_iters=3, r_warmup_iters=5)
    _train(a, 7, 0, shape)
    t = int(a.num_batches_tracked)
    published = {"weight": a.weight.detach().clone(), "bias": a.bias.detach().clone(),
                 "running_var": a.running_var.view(1, C, 1, 1).clone(), "iters": torch.tensor([t])}
    for key in ("buffer_x2", "buffer_gz"):
        ring = torch.empty(W, C)
        chronological = a.state_dict()[key]  # saved oldest first
        for age in range(W):
            ring[(t - age) % W] = chronological[W - 1 - age]
        published[key] = ring
    b = MABN2d(C, 2, 8, warmup_iters=3, r_warmup_iters=5)
    b.load_state_dict(published)
    assert int(b.num_batches_tracked) == t and int(b.groups_seen) == t
    for (ya, ga), (yb, gb) in zip(_train(a, 6, 1, shape), _train(b, 6, 1, shape)):
        torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-6)


def test_loads_published_imagenet_format():
    """Format: running_var (C,), sta_matrix (W, 2W), pre_x2/pre_gz (W, C), iters float (1,)."""
    torch.manual_seed(0)
    C, W = 4, 4
    shape = (2 * W, C, 3, 3)
    a = MABN2d(C, 2, 2 * W, warmup_iters=2, split_batch=True, r_warmup_iters=3)
    _train(a, 5, 0, shape)
    published = {"weight": a.weight.detach().clone(), "bias": a.bias.detach().clone(),
                 "running_var": a.running_var.clone(), "sta_matrix": torch.ones(W, 2 * W) / W,
                 "pre_x2": a.buffer_x2.clone(), "pre_gz": a.buffer_gz.clone(),
                 "iters": torch.tensor([5.0])}
    b = MABN2d(C, 2, 2 * W, warmup_iters=2, split_batch=True, r_warmup_iters=3)
    b.load_state_dict(published)
    assert int(b.num_batches_tracked) == 5 and int(b.groups_seen) == 5 * W
    assert torch.equal(b.running_mean, torch.zeros(C))
    for (ya, ga), (yb, gb) in zip(_train(a, 4, 1, shape), _train(b, 4, 1, shape)):
        torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-6)


def test_published_checkpoint_with_other_window_is_refused():
    state = MABN2d(4, 2, 8).state_dict()
    state.pop("num_batches_tracked")
    state["iters"] = torch.tensor([3])
    with pytest.raises(ValueError, match="window of 4 groups"):
        MABN2d(4, 2, 32).load_state_dict(state)


def test_eval_is_per_channel_affine_and_batch_size_one_works():
    layer = MABN2d(3, 1, 4)
    layer(torch.randn(1, 3, 1, 1)).sum().backward()
    layer.eval()
    x = torch.randn(5, 3, 2, 2)
    expected = layer.weight.view(1, 3, 1, 1) * x / torch.sqrt(layer.running_var.view(1, 3, 1, 1) + 1e-5) + layer.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert MABN1d(3, 1, 4)(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize("build,x,match", [
    (lambda: MABN2d(4), torch.randn(2, 3, 4, 4), "got an input with 3 channels"),
    (lambda: MABN2d(4), torch.randn(2, 4, 4), "expects 4-D input"),
    (lambda: MABN1d(4), torch.randn(2, 4, 4, 4), "expects 2-D or 3-D input"),
    (lambda: MABN3d(4), torch.randn(2, 4, 4, 4), "expects 5-D input"),
    (lambda: MABN2d(4, 2, 8, split_batch=True), torch.randn(3, 4, 2, 2), "divisible by 2"),
])
def test_bad_inputs_raise_clear_errors(build, x, match):
    with pytest.raises(ValueError, match=match):
        build()(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="multiple of B"):
        MABN2d(4, 3, 32)
    with pytest.raises(ValueError, match="r_max"):
        MABN2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="momentum"):
        MABN2d(4, momentum=1.5)


def test_training_step_has_no_host_sync():
    """Every training op must stay on the device: fail on any tensor-to-Python conversion."""
    layer = MABN2d(4, 2, 4, warmup_iters=1, split_batch=True, r_warmup_iters=1)
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    calls = []

    class HostSyncGuard(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
                        torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.numpy):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with HostSyncGuard():
        for _ in range(3):
            layer(x).sum().backward()
    assert calls == []


# Fused kernels inductor generates and runs for one compiled training forward + backward of a
# one-group MABN layer (the benchmark's): 4 in the forward, 1 in the backward.
COMPILED_KERNEL_BUDGET = 5


def test_compiled_one_group_step_generates_few_kernels_and_matches_eager():
    from benchmarks.harness import compiled_kernels

    def build():
        torch.manual_seed(0)
        return MABN2d(64, 2, 32, warmup_iters=0, r_warmup_iters=0)

    eager, compiled_layer = build(), build()
    compiled = torch.compile(compiled_layer)
    x = torch.randn(2, 64, 7, 7, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(2, 64, 7, 7, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()

    def steps():
        for _ in range(2):
            x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
            eager(x_eager).backward(grad)
            compiled(x_compiled).backward(grad)
            torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-6)

    kernels = compiled_kernels(steps).fused
    torch.testing.assert_close(compiled_layer.buffer_gz, eager.buffer_gz, rtol=1e-5, atol=1e-8)
    assert kernels <= COMPILED_KERNEL_BUDGET, kernels


# aot_eager_decomp_partition runs the min-cut partitioner that decides what the backward
# recomputes, without a C++ build; inductor is what torch.compile uses by default.
@pytest.mark.parametrize("split", [True, False])  # shifting windows, rings (the slot read in the backward)
@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", "inductor"])
def test_torch_compile_matches_eager_in_one_graph_without_recompiling(backend, split):
    """Ten steps cross the warm-up and r switches (and wrap a ring of 4): one compiled graph,
    gradients equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from mabn import CenConv2d

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(CenConv2d(3, 8, 3, padding=1),
                                   MABN2d(8, 2, 8, warmup_iters=3, split_batch=split, r_warmup_iters=5),
                                   torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))

    torch._dynamo.reset()
    counting_backend = CompileCounterWithBackend(backend)
    eager, compiled_model = build(), build()
    compiled = torch.compile(compiled_model, backend=counting_backend)
    gen = torch.Generator().manual_seed(1)
    try:
        for _ in range(10):
            x = torch.randn(4, 3, 6, 6, generator=gen)
            for model in (eager, compiled):
                model.zero_grad()
            y_eager, y_compiled = eager(x), compiled(x)
            y_eager.square().mean().backward()
            y_compiled.square().mean().backward()
            torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
            for p_eager, p_compiled in zip(eager.parameters(), compiled_model.parameters()):
                torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    assert counting_backend.frame_count == 1, f"{counting_backend.frame_count} graphs compiled (graph break or recompile)"
    torch.testing.assert_close(compiled_model[1].buffer_gz, eager[1].buffer_gz, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    assert int(compiled_model[1].num_batches_tracked) == 10


@pytest.mark.parametrize("window_full", [False, True])
@pytest.mark.parametrize("split,batch", [(False, 2), (True, 2), (True, 8)])
def test_training_step_dispatches_few_aten_ops(split, batch, window_full):
    """Every dispatched op is a kernel launch (or its CPU overhead); views and the autograd
    engine's gradient accumulation count too, as they do for nn.BatchNorm2d's 7."""
    layer = MABN2d(64, 2, 8, warmup_iters=1, split_batch=split, r_warmup_iters=1)
    count = training_step_ops(layer, batch, warmup_steps=6 if window_full else 1)
    assert count <= OP_BUDGETS[(split, batch // 2, window_full)], count


def test_autocast_bf16_statistics_in_float32():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    layer = MABN2d(4, 2, 4, warmup_iters=1, r_warmup_iters=2)
    x = torch.randn(2, 3, 8, 8) * 300
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(conv(x))
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
    assert layer.running_var.dtype == torch.float32
    assert torch.isfinite(layer.running_var).all() and torch.isfinite(conv.weight.grad).all()


def test_float16_large_inputs_stay_finite():
    layer = MABN2d(4, 2, 4, warmup_iters=1, r_warmup_iters=1)
    for _ in range(3):
        x = (torch.rand(2, 4, 6, 6) * 2e3 - 1e3).half().requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y))
        assert y.dtype == torch.float16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.running_var).all() and layer.running_var.max() > 1e4


def test_reset_running_stats_clears_schedule():
    layer = MABN2d(4, 2, 4)
    _train(layer, 3, 0, (2, 4, 2, 2))
    layer.reset_running_stats()
    assert int(layer.num_batches_tracked) == 0 and int(layer.groups_seen) == 0
    assert torch.equal(layer.running_var, torch.ones(4)) and not layer.buffer_x2.any() and not layer.buffer_gz.any()


def test_window_math_single_value_window():
    """real_B == B: the window is one group, so the moving average is the group's own value."""
    torch.manual_seed(0)
    layer = MABN2d(2, 2, 2, warmup_iters=0, r_warmup_iters=10)
    x = torch.randn(2, 2, 3, 3)
    for _ in range(3):
        y = layer(x)
    chi = x.square().mean(dim=(0, 2, 3))
    torch.testing.assert_close(y, layer.weight.view(1, 2, 1, 1) * x / torch.sqrt(chi + 1e-5).view(1, 2, 1, 1) + layer.bias.view(1, 2, 1, 1))
    assert math.isclose(layer.window, 1)


def test_inplace_activation_after_mabn_keeps_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    grads = []
    for inplace in (False, True):
        layer = MABN2d(3, 2, 4, warmup_iters=0, split_batch=True)
        net = torch.nn.Sequential(layer, torch.nn.ReLU(inplace=inplace))
        xi = x.clone().requires_grad_()
        net(xi).square().sum().backward()
        grads.append((xi.grad, layer.weight.grad))
    torch.testing.assert_close(grads[0], grads[1])
