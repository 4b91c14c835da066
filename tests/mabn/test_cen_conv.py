"""CenConv against nn.ConvNd with an explicitly centralized weight."""
import pytest
import torch
from torch import nn

from mabn import CenConv1d, CenConv2d, CenConv3d, centralize_weight

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
