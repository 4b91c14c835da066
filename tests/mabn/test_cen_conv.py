"""CenConv against nn.ConvNd with an explicitly centralized weight."""
from typing import List, Tuple

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mabn import CenConv1d, CenConv2d, CenConv3d, cen_conv, centralize_weight

CASES = [
    (CenConv1d, nn.Conv1d, None, (2, 4, 9), dict(kernel_size=3, stride=2, padding=1, bias=True)),
    (CenConv2d, nn.Conv2d, None, (2, 4, 7, 7), dict(kernel_size=(3, 1), padding=(1, 0), dilation=2, groups=2)),
    (CenConv2d, nn.Conv2d, None, (1, 4, 6, 6), dict(kernel_size=3, padding=1, padding_mode="reflect", bias=True)),
    (CenConv3d, nn.Conv3d, None, (1, 4, 4, 5, 5), dict(kernel_size=3, padding="same", groups=4)),
]


@pytest.mark.parametrize("cen_cls,conv_cls,_,shape,kwargs", CASES)
def test_equals_conv_with_centralized_weight(cen_cls, conv_cls, _, shape, kwargs):
    torch.manual_seed(0)
    cen = cen_cls(4, 8, **kwargs)
    assert isinstance(cen, conv_cls)
    plain = conv_cls(4, 8, **{"bias": False, **kwargs})
    plain.load_state_dict(cen.state_dict())
    with torch.no_grad():
        plain.weight.copy_(centralize_weight(cen.weight))
    x = torch.randn(shape)
    torch.testing.assert_close(cen(x), plain(x))
    filter_means = cen.centralized_weight.mean(dim=tuple(range(1, cen.weight.dim())))
    torch.testing.assert_close(filter_means, torch.zeros(8), atol=1e-7, rtol=0)


def test_published_defaults_and_positional_order():
    conv = CenConv2d(3, 16)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (0, 0)
    assert conv.bias is None and conv.groups == 1
    conv = CenConv2d(4, 8, 1, 2, 0, 1, 2, True)
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.groups == 2 and conv.bias is not None


def test_default_init_identical_to_torch_conv():
    torch.manual_seed(3)
    cen = CenConv2d(8, 16, 3, bias=True)
    torch.manual_seed(3)
    plain = nn.Conv2d(8, 16, 3, bias=True)
    assert torch.equal(cen.weight, plain.weight) and torch.equal(cen.bias, plain.bias)


def test_gradcheck_float64():
    conv = CenConv2d(2, 3, 3, padding=1, bias=True).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    params = (conv.weight, conv.bias)

    def fn(x, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params)


def test_state_dict_interchangeable_with_conv():
    plain = nn.Conv2d(4, 8, 3)
    cen = CenConv2d(4, 8, 3, bias=True)
    cen.load_state_dict(plain.state_dict())
    assert torch.equal(cen.weight, plain.weight)


def _reference_conv(conv, x):
    """Autograd through an explicit centralization and the functional conv."""
    weight = conv.weight - conv.weight.mean(dim=tuple(range(1, conv.weight.dim())), keepdim=True)
    return conv._conv_forward(x, weight, conv.bias)


GRAD_CASES = [
    (CenConv1d, (2, 4, 11), dict(kernel_size=3, stride=2, padding=1, bias=True)),
    (CenConv1d, (2, 4, 11), dict(kernel_size=4, padding="same", dilation=2, padding_mode="circular")),
    (CenConv2d, (2, 4, 9, 8), dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2)),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=3, padding=1, padding_mode="reflect", bias=True)),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=(2, 3), padding="same", groups=4, bias=True)),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=3, padding=(1, 2), padding_mode="circular", stride=(1, 2))),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=3, padding="valid", padding_mode="replicate")),
    (CenConv3d, (1, 4, 5, 6, 5), dict(kernel_size=3, stride=(1, 2, 1), padding=1, groups=2, bias=True)),
]


# groups=1 and a weight with more elements than the input: the box-sum formulation on the CPU
BOX_SUM_CASES = [
    (CenConv1d, (2, 4, 11), dict(kernel_size=3, stride=2, padding=1, bias=True)),
    (CenConv1d, (2, 4, 11), dict(kernel_size=4, padding="same", dilation=2, padding_mode="circular")),
    (CenConv2d, (2, 4, 9, 8), dict(kernel_size=3, stride=2, padding=2, dilation=2)),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=3, padding=1, padding_mode="reflect", bias=True)),
    (CenConv2d, (1, 4, 8, 7), dict(kernel_size=1, stride=2)),
    (CenConv2d, (2, 4, 7, 7), dict(kernel_size=(2, 3), padding="same", bias=True)),
    (CenConv2d, (1, 4, 9, 9), dict(kernel_size=5, stride=3, padding=(0, 2))),
    (CenConv3d, (1, 4, 3, 4, 3), dict(kernel_size=3, stride=(1, 2, 1), padding=1, bias=True)),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
@pytest.mark.parametrize("cen_cls,shape,kwargs", GRAD_CASES)
def test_gradients_match_autograd_reference_with_repeated_calls(cen_cls, shape, kwargs):
    """The conv is called twice (shared head) before one backward; all gradients must match."""
    torch.manual_seed(0)
    _check_against_reference(cen_cls(4, 8, **kwargs), shape)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
@pytest.mark.parametrize("cen_cls,shape,kwargs", BOX_SUM_CASES)
def test_box_sum_formulation_matches_autograd_reference(cen_cls, shape, kwargs, monkeypatch):
    torch.manual_seed(0)
    cen = cen_cls(4, 64, **kwargs)
    assert cen_conv._box_sum_is_cheaper(torch.empty(shape), cen.weight, cen.groups)
    chosen = []
    monkeypatch.setattr(cen_conv, "_box_sum_is_cheaper", lambda *args: chosen.append(True) or True)
    _check_against_reference(cen, shape)
    assert chosen


def test_box_sum_serves_cpu_convs_whose_weight_outgrows_the_input():
    deep = torch.empty(512, 512, 3, 3)
    assert cen_conv._box_sum_is_cheaper(torch.empty(2, 512, 7, 7), deep, 1)
    assert not cen_conv._box_sum_is_cheaper(torch.empty(2, 512, 7, 7), torch.empty(512, 256, 3, 3), 2)
    assert not cen_conv._box_sum_is_cheaper(torch.empty(2, 64, 56, 56), torch.empty(64, 64, 3, 3), 1)
    assert not cen_conv._box_sum_is_cheaper(torch.empty(2, 512, 7, 7, device="meta"), deep, 1)


def test_box_sum_and_centralized_weight_agree_in_float32_for_large_filter_means(monkeypatch):
    """A converted network's filters may carry large means; the box sum loses a few bits there."""
    torch.manual_seed(0)
    cen = CenConv2d(16, 64, 3, padding=1)
    with torch.no_grad():
        cen.weight.mul_(0.1).add_(torch.rand(64, 1, 1, 1))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    outputs = []
    for box_sum in (True, False):
        monkeypatch.setattr(cen_conv, "_box_sum_is_cheaper", lambda *args, box_sum=box_sum: box_sum)
        cen.zero_grad()
        x.grad = None
        y = cen(x)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad.clone(), cen.weight.grad.clone()))
    for box_sum, centralized in zip(*outputs):
        torch.testing.assert_close(box_sum, centralized, rtol=1e-4, atol=1e-4 * centralized.abs().max().item())


def _check_against_reference(cen: nn.Module, shape: Tuple[int, ...]) -> None:
    """Two calls of ``cen`` before one backward against autograd through the explicit
    centralization: outputs, input and parameter gradients in float64."""
    torch.manual_seed(0)
    cen = cen.double()
    x1 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grads = []
    for forward in (cen, lambda x: _reference_conv(cen, x)):
        cen.zero_grad()
        y1, y2 = forward(x1), forward(x2)
        (y1.square().sum() + (y2 * y2.detach().sin()).sum()).backward()
        grads.append([x1.grad.clone(), x2.grad.clone()] + [p.grad.clone() for p in cen.parameters()])
        x1.grad = x2.grad = None
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected)
    filter_sums = grads[0][2].sum(dim=tuple(range(1, cen.weight.dim())))
    torch.testing.assert_close(filter_sums, torch.zeros_like(filter_sums), atol=1e-9, rtol=0)


def _saved_activation_bytes(module, x):
    """Bytes of the distinct storages autograd saves for backward, other than parameters and buffers."""
    owned = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(saved.values())


@pytest.mark.parametrize("out_channels", [16, 256])  # centralized weight, box sum
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding=1, bias=True, stride=2), dict(padding="same")])
def test_saves_what_plain_conv_saves_plus_the_filter_means(kwargs, out_channels):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    plain = nn.Conv2d(8, out_channels, 3, **kwargs)
    cen = CenConv2d(8, out_channels, 3, **kwargs)
    filter_means = out_channels * cen.weight.element_size()
    assert _saved_activation_bytes(cen, x) <= _saved_activation_bytes(plain, x) + filter_means


class _HalfConvolutionRecorder(TorchDispatchMode):
    """Runs ``aten.convolution`` in float16 below the Function, as CUDA autocast does, and records
    (and checks they agree) the dtypes of (grad_output, input, weight) of every
    ``aten.convolution_backward``.

    The Function's own autocast handling cannot see this cast, so the test checks that the
    backward follows the dtype the forward's convolution ran in, on CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backward_dtypes: List[Tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            args = tuple(a.half() if isinstance(a, torch.Tensor) else a for a in args)
        elif func is torch.ops.aten.convolution_backward.default:
            dtypes = tuple(a.dtype for a in args[:3])
            self.backward_dtypes.append(dtypes)
            assert len(set(dtypes)) == 1, f"convolution_backward got mixed dtypes {dtypes}"
        return func(*args, **(kwargs or {}))


def test_backward_runs_in_the_dtype_of_the_forward_convolution():
    torch.manual_seed(0)
    cen = CenConv2d(4, 8, 3, padding=1, bias=True)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    recorder = _HalfConvolutionRecorder()
    with recorder:
        y = cen(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.float16
    assert recorder.backward_dtypes == [(torch.float16,) * 3]
    assert x.grad.dtype == x.dtype and cen.weight.grad.dtype == cen.weight.dtype
    assert cen.bias.grad.dtype == cen.bias.dtype


def _check_autocast_matches_float32(device: str, dtype: torch.dtype, tol: float) -> None:
    """CenConv2d under autocast: output dtype as ``nn.Conv2d``'s, gradients in the parameters'
    (and input's) dtypes and close to a float32 run of the same module."""
    torch.manual_seed(0)
    cen = CenConv2d(8, 16, 3, padding=1, stride=2, bias=True).to(device)
    plain = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=True).to(device)
    x = torch.randn(4, 8, 12, 12, device=device, requires_grad=True)
    target = torch.randn(4, 16, 6, 6, device=device)
    grads = []
    for enabled in (False, True):
        cen.zero_grad()
        x.grad = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            y = cen(x)
            assert y.dtype == plain(x).dtype
            loss = (y.float() * target).sum()
        loss.backward()
        grads.append([x.grad, cen.weight.grad, cen.bias.grad])
    assert y.dtype == dtype
    for actual, expected in zip(grads[1], grads[0]):
        assert actual.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_cpu_autocast_bfloat16():
    _check_autocast_matches_float32("cpu", torch.bfloat16, tol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_autocast_float16():
    _check_autocast_matches_float32("cuda", torch.float16, tol=1e-2)
