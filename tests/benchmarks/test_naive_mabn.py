"""The benchmark's naive baseline is a correct MABN: same numbers as mabn.MABN2d."""
import pytest
import torch

from mabn import MABN2d

from benchmarks.naive_mabn import NaiveMABN2d


def _max_rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("warmup_iters,r_warmup_iters", [(0, 0), (5, 12)], ids=["bench-settings", "schedules"])
def test_naive_baseline_matches_mabn2d(warmup_iters, r_warmup_iters):
    """Forward, input/weight/bias gradients and running_var over 30 iterations (W = 8)."""
    torch.manual_seed(0)
    fast = MABN2d(4, 2, 16, warmup_iters=warmup_iters, r_warmup_iters=r_warmup_iters)
    naive = NaiveMABN2d(4, 2, 16, warmup_iters=warmup_iters, r_warmup_iters=r_warmup_iters)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-0.5, 0.5)
        naive.weight.copy_(fast.weight)
        naive.bias.copy_(fast.bias)
    for it in range(30):
        # the scale jumps every 6 iterations so that r hits both clamp bounds once enabled
        level = (0.05, 1.0, 12.0)[(it // 6) % 3]
        x = torch.randn(2, 4, 5, 6) * level + 0.1 * level
        dy = torch.randn_like(x)
        x_fast, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_fast, y_naive = fast(x_fast), naive(x_naive)
        y_fast.backward(dy)
        y_naive.backward(dy)
        for name, a, b in [("y", y_naive, y_fast), ("dx", x_naive.grad, x_fast.grad),
                           ("dw", naive.weight.grad, fast.weight.grad), ("db", naive.bias.grad, fast.bias.grad),
                           ("running_var", naive.running_var, fast.running_var)]:
            assert _max_rel(a, b) <= 1e-4, f"iteration {it + 1}: {name} differs"
        fast.zero_grad()
        naive.zero_grad()
    assert int(naive.iters) == int(fast.num_batches_tracked) == 30
    fast.eval()
    naive.eval()
    x = torch.randn(2, 4, 5, 6)
    assert _max_rel(naive(x), fast(x)) <= 1e-4
