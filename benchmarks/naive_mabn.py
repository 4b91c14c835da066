"""A deliberately naive MABN layer: the BASELINE of ``python -m benchmarks.bench``, nothing else.

Do not use this layer to train; use :class:`mabn.MABN2d`. It exists so the benchmark can show
what the straightforward way of writing MABN costs next to the fast implementation. It follows
the structure in which the paper's published reference layer was written (this is an
independent rewrite from the algorithm, not a copy):

* one ``torch.autograd.Function`` per layer call;
* Python-side control flow driven by ``iters.item()`` on every step (a host/device sync);
* separate reductions, one dimension at a time (``(x * x).mean(3).mean(2).mean(0)``);
* ring buffers indexed by ``iters % W``;
* ``z = x / sqrt(chi + eps)`` computed and saved for the backward pass;
* elementwise operations issued one at a time.

Semantics (per channel, the whole batch is one normalization group, i.e. MABN2d with
``split_batch=False``), with ``iters`` counting training forwards from 1::

    chi_t = mean(x ** 2)  -> ring slot iters % W
    chi   = chi_t  if iters <= W or iters < warmup_iters  else  mean(ring)
    z     = x / sqrt(chi + eps)
    r     = 1  if iters <= r_warmup_iters  else  clamp(sqrt(chi + eps) / sqrt(running_var + eps), 1/r_max, r_max)
    y     = weight * r * z + bias
    running_var <- momentum * running_var + (1 - momentum) * chi

    g     = dy * weight * r
    psi_t = mean(g * z)   -> ring slot iters % W, same rule as chi
    dx    = (g - z * psi) / sqrt(chi + eps)
    dw    = sum(dy * r * z),  db = sum(dy)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NaiveMABN2d"]


class _NaiveMABNFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, running_var, buffer_x2, buffer_gz, iters, window, eps, momentum,
                warmup_iters, r_warmup_iters, r_max):
        channels = x.size(1)
        x2 = (x * x).mean(dim=3).mean(dim=2).mean(dim=0)
        buffer_x2[iters % window].copy_(x2)
        if iters <= window or iters < warmup_iters:
            var = x2.view(1, channels, 1, 1)
        else:
            var = buffer_x2.mean(dim=0).view(1, channels, 1, 1)
        std = (var + eps).sqrt()
        z = x / std
        if iters <= r_warmup_iters:
            r = torch.ones_like(var)
        else:
            r = std / (running_var.view(1, channels, 1, 1) + eps).sqrt()
            r = r.clamp(1.0 / r_max, r_max)
        y = r * z
        y = weight.view(1, channels, 1, 1) * y
        y = y + bias.view(1, channels, 1, 1)
        running_var.copy_(momentum * running_var + (1.0 - momentum) * var.view(channels))
        ctx.iters, ctx.window, ctx.warmup_iters = iters, window, warmup_iters
        ctx.save_for_backward(z, std, r, weight, buffer_gz)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        z, std, r, weight, buffer_gz = ctx.saved_tensors
        iters, window = ctx.iters, ctx.window
        channels = z.size(1)
        g = grad_output * r
        g = g * weight.view(1, channels, 1, 1)
        gz = (g * z).mean(dim=3).mean(dim=2).mean(dim=0)
        buffer_gz[iters % window].copy_(gz)
        if iters <= window or iters < ctx.warmup_iters:
            psi = gz.view(1, channels, 1, 1)
        else:
            psi = buffer_gz.mean(dim=0).view(1, channels, 1, 1)
        grad_x = g - z * psi
        grad_x = grad_x / std
        grad_weight = (grad_output * r * z).sum(dim=3).sum(dim=2).sum(dim=0)
        grad_bias = grad_output.sum(dim=3).sum(dim=2).sum(dim=0)
        return (grad_x, grad_weight, grad_bias) + (None,) * 10


class NaiveMABN2d(nn.Module):
    """Benchmark baseline only: MABN over (N, C, H, W), whole batch as one group.

    Same arguments and schedule as ``mabn.MABN2d(num_features, B, real_B, eps, momentum,
    warmup_iters, r_max=..., r_warmup_iters=...)`` with ``split_batch=False``; ``momentum``
    weights the old ``running_var``. See the module docstring for why this layer exists.
    """

    def __init__(self, num_features: int, B: int = 2, real_B: int = 32, eps: float = 1e-5,
                 momentum: float = 0.98, warmup_iters: int = 100, *, r_max: float = 5.0,
                 r_warmup_iters: Optional[int] = None) -> None:
        super().__init__()
        if real_B % B != 0:
            raise ValueError(f"real_B must be a multiple of B; got B={B}, real_B={real_B}")
        self.num_features = num_features
        self.window = real_B // B
        self.eps, self.momentum = eps, momentum
        self.warmup_iters = warmup_iters
        self.r_max = r_max
        self.r_warmup_iters = max(1000, warmup_iters) if r_warmup_iters is None else r_warmup_iters
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long))
        self.register_buffer("buffer_x2", torch.zeros(self.window, num_features))
        self.register_buffer("buffer_gz", torch.zeros(self.window, num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.batch_norm(x, torch.zeros_like(self.running_var), self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        self.iters.copy_(self.iters + 1)
        return _NaiveMABNFunction.apply(
            x, self.weight, self.bias, self.running_var, self.buffer_x2, self.buffer_gz,
            int(self.iters.item()), self.window, self.eps, self.momentum, self.warmup_iters,
            self.r_warmup_iters, self.r_max)
