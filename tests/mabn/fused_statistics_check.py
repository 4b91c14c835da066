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
    ("split, window filling", dict(B=2, real_B=8, warmup_iters=2, r_warmup_iters=3, split_batch=True),
     (8, 16, 3, 3), torch.float32, torch.float32, None),
    ("split, window shorter than the groups", dict(B=2, real_B=4, warmup_iters=0, r_warmup_iters=0,
                                                    split_batch=True, first_batch_running_var=True),
     (8, 16, 3, 3), torch.float32, torch.float32, None),
    ("split, channels past one block, 1d", dict(B=1, real_B=4, warmup_iters=1, r_warmup_iters=2, split_batch=True),
     (3, 1100, 2), torch.float32, torch.float32, None),
    ("split, loss scale", dict(B=2, real_B=16, warmup_iters=1, r_warmup_iters=2, split_batch=True), (6, 8, 3, 3),
     torch.float32, torch.float32, 512.0),
    ("split, float64", dict(B=2, real_B=8, warmup_iters=1, r_warmup_iters=2, split_batch=True), (4, 8, 3, 3),
     torch.float64, torch.float64, None),
    ("split, float16 input, float32 layer", dict(B=2, real_B=8, warmup_iters=1, r_warmup_iters=2, split_batch=True),
     (4, 8, 3, 3), torch.float16, torch.float32, None),
)
STEPS = 12
NAN_INPUT_STEP, INF_GRADIENT_STEP = 7, 9


def _relative(a: torch.Tensor, b: torch.Tensor, finite_reference_only: bool = False) -> float:
    """Largest |a - b| over the largest finite |b|; equal values (infinities too) and NaN against
    NaN count 0, any other non-finite difference is infinite. ``finite_reference_only``: places
    where ``b`` is not finite are not compared."""
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if finite_reference_only:
        same |= ~torch.isfinite(b)
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
    passes = {"forward_statistics": "forward", "grouped_forward_statistics": "forward",
              "backward_coefficient": "backward", "grouped_backward": "backward"}
    originals = {name: getattr(fused_statistics, name) for name in passes}

    def counted(name, function):
        def wrapper(*args, **kw):
            calls[passes[name]] += 1
            return function(*args, **kw)
        return wrapper

    for name, function in originals.items():
        setattr(fused_statistics, name, counted(name, function))
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
            # at a step with a non-finite input or gradient, outputs and gradients are compared
            # where the eager path's are finite: its split window average is a matrix product, in
            # which 0 * inf makes every group of the channel NaN, where the kernels sum the window
            nonfinite_step = step in (NAN_INPUT_STEP, INF_GRADIENT_STEP)
            report["outputs"] = max(report["outputs"], *(_relative(f, e, nonfinite_step) for e, f in zip(*results)))
            for name, buffer in eager.named_buffers():
                other = dict(fused.named_buffers())[name]
                if buffer.dtype == torch.long:
                    report["counters_equal"] &= torch.equal(buffer, other)
                else:
                    report["buffers"] = max(report["buffers"], _relative(other, buffer))
    finally:
        for name, function in originals.items():
            setattr(fused_statistics, name, function)
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
