"""MABN's fused statistics kernels against the eager path, step by step.

:func:`compare_fused_with_eager` trains two copies of a layer, one with ``fused_statistics=True``,
on the same inputs and reports the largest differences of outputs, gradients and buffers, and how
often the kernels ran. The ``cuda`` tests call it on a GPU. Run as a script under Triton's
interpreter (``TRITON_INTERPRET=1 python fused_statistics_check.py``), it checks the same kernels
on the CPU and prints the report of every case as JSON: the CPU tests run it that way, since the
interpreter is chosen when Triton is imported.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Dict, List

import torch

import mabn.fused_statistics as fused_statistics
from mabn import MABN1d, MABN2d

# (name, layer kwargs, input shape, input dtype, layer dtype, loss scale or None)
CASES = (
    ("warm-up then settled", dict(B=2, real_B=8, warmup_iters=3, r_warmup_iters=5), (2, 16, 5, 5), torch.float32,
     torch.float32, None),
    ("first batch running_var", dict(B=2, real_B=8, warmup_iters=0, r_warmup_iters=0, first_batch_running_var=True),
     (2, 16, 5, 5), torch.float32, torch.float32, None),
    ("channels past one block, 1d", dict(B=1, real_B=4, warmup_iters=2, r_warmup_iters=3), (1, 1100, 3), torch.float32,
     torch.float32, None),
    ("loss scale", dict(B=2, real_B=8, warmup_iters=2, r_warmup_iters=4), (2, 8, 4, 4), torch.float32, torch.float32,
     1024.0),
    ("float64", dict(B=2, real_B=8, warmup_iters=2, r_warmup_iters=4), (2, 8, 4, 4), torch.float64, torch.float64,
     None),
    ("bfloat16 input, float32 layer", dict(B=2, real_B=8, warmup_iters=2, r_warmup_iters=4), (2, 8, 4, 4),
     torch.bfloat16, torch.float32, None),
    ("float16 layer", dict(B=2, real_B=8, warmup_iters=2, r_warmup_iters=4), (2, 8, 4, 4), torch.float16,
     torch.float16, None),
)
STEPS = 12
NAN_INPUT_STEP, INF_GRADIENT_STEP = 7, 9


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest finite |b|; equal values (infinities too) and NaN against
    NaN count 0, any other non-finite difference is infinite."""
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    difference = (a - b).abs().masked_fill(same, 0.0)
    if not torch.isfinite(difference).all():
        return math.inf
    scale = b.abs().masked_fill(~torch.isfinite(b), 0.0).max().item()
    return difference.max().item() / max(scale, 1e-30)


def compare_fused_with_eager(kwargs: dict, shape: tuple, dtype: torch.dtype, layer_dtype: torch.dtype, loss_scale,
                             device: torch.device) -> Dict:
    """Train an eager and a fused copy of one MABN layer for :data:`STEPS` steps (a NaN input
    pixel at one step, an infinite gradient at another) and report the largest relative
    differences (``outputs``: outputs and gradients, ``buffers``: every float buffer after every
    step; each relative to the tensor's largest value),
    whether the integer buffers stayed equal, and the kernel calls per pass."""
    torch.manual_seed(0)
    layer_class = MABN2d if len(shape) == 4 else MABN1d
    eager = layer_class(shape[1], **kwargs).to(device, layer_dtype)
    fused = copy.deepcopy(eager)
    fused.fused_statistics = True
    calls = {"forward": 0, "backward": 0}
    originals = (fused_statistics.forward_statistics, fused_statistics.backward_coefficient)

    def counted(name, function):
        def wrapper(*args, **kw):
            calls[name] += 1
            return function(*args, **kw)
        return wrapper

    fused_statistics.forward_statistics = counted("forward", originals[0])
    fused_statistics.backward_coefficient = counted("backward", originals[1])
    report = {"outputs": 0.0, "buffers": 0.0, "counters_equal": True}
    try:
        for step in range(STEPS):
            x = torch.randn(shape, dtype=dtype, device=device) * 3
            grad = torch.randn(shape, dtype=dtype, device=device)
            if step == NAN_INPUT_STEP:
                x.view(-1)[0] = math.nan
            if step == INF_GRADIENT_STEP:
                grad.view(-1)[-1] = math.inf
            results = []
            for layer in (eager, fused):
                layer.grad_scale = None if loss_scale is None else torch.tensor(loss_scale, device=device)
                inputs = x.clone().requires_grad_()
                y = layer(inputs)
                y.backward(grad if loss_scale is None else grad * loss_scale)
                results.append((y.detach(), inputs.grad, layer.weight.grad, layer.bias.grad))
                layer.weight.grad = layer.bias.grad = None
            report["outputs"] = max(report["outputs"], *(_relative(f, e) for e, f in zip(*results)))
            for name, buffer in eager.named_buffers():
                other = dict(fused.named_buffers())[name]
                if buffer.dtype == torch.long:
                    report["counters_equal"] &= torch.equal(buffer, other)
                else:
                    report["buffers"] = max(report["buffers"], _relative(other, buffer))
    finally:
        fused_statistics.forward_statistics, fused_statistics.backward_coefficient = originals
    report["calls"] = calls
    report["skipped_updates"] = int(fused.skipped_updates)
    return report


def main() -> List[Dict]:
    reports = []
    for name, kwargs, shape, dtype, layer_dtype, loss_scale in CASES:
        report = compare_fused_with_eager(kwargs, shape, dtype, layer_dtype, loss_scale, torch.device("cpu"))
        reports.append(dict(case=name, **report))
    return reports


if __name__ == "__main__":
    print(json.dumps(main()))
