"""Checks the norm layers' tests share: a compiled layer against its eager twin (one training
step each on copies of an input, then their parameter gradients and state), and half-precision
input against float32 input, and a grouped layer against one reference copy per group."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["assert_same_step", "assert_same_gradients_and_state", "assert_half_input_matches_float32",
           "assert_matches_per_group_copies"]


def assert_same_step(compiled, eager: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    """Forward and backward (the same random upstream gradient) of both on copies of ``x``: the
    outputs and the input gradients agree within ``tol``."""
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_c, y_e = compiled(x_c), eager(x_e)
    torch.testing.assert_close(y_c, y_e, rtol=tol, atol=tol)
    upstream = torch.randn_like(y_e)
    y_c.backward(upstream)
    y_e.backward(upstream)
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=tol, atol=tol)


def assert_same_gradients_and_state(module: nn.Module, eager: nn.Module, tol: float = 1e-10) -> None:
    """The parameter gradients and every state-dict entry of the two modules agree within ``tol``."""
    for p_c, p_e in zip(module.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=tol, atol=tol)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(module.state_dict()[k], v, rtol=tol, atol=tol)


def assert_half_input_matches_float32(layer: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """``layer`` on half-precision ``x`` returns ``x``'s dtype, finite, and matches ``reference``
    on ``x`` in float32 (output rounded to ``x``'s dtype); both keep float32 running statistics
    that agree."""
    y, y_ref = layer(x), reference(x.float())
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), y_ref.to(x.dtype).float())
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert layer.running_mean.dtype == torch.float32


def assert_matches_per_group_copies(layer: nn.Module, refs: list, x: torch.Tensor, B: int) -> torch.Tensor:
    """``layer`` on ``x`` against ``refs[k]`` on the k-th group of ``B`` samples: outputs, input
    gradients (the same random upstream gradient) and the parameter gradients summed over the
    copies agree; returns the layer's output."""
    x, x_ref = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = torch.cat([ref(group) for ref, group in zip(refs, x_ref.split(B))])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for name in ("weight", "bias"):
        ref_grad = sum(getattr(ref, name).grad for ref in refs)
        torch.testing.assert_close(getattr(layer, name).grad, ref_grad, rtol=1e-10, atol=1e-10)
    return y
