"""cls.metrics and the optimizer: the published loss, top-k and SGD, numerically."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cls.metrics import Meter, label_smoothing_loss, topk_correct


def test_label_smoothing_equals_the_published_formula():
    logits, target = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 12, (6,))
    q = F.one_hot(target, 12).double() * 0.9 + 0.1 / 12
    published = (-(F.log_softmax(logits, 1) * q).sum(1)).mean()
    torch.testing.assert_close(label_smoothing_loss(logits.float(), target).double(), published, rtol=1e-6, atol=1e-6)


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target, (1, 2, 5)).tolist() == [1.0, 2.0, 3.0]


def test_meter_errors_in_percent():
    meter = Meter()
    meter.add(4.0, 1.0, 3.0, 4.0)
    assert (meter.loss, meter.top1_err, meter.top5_err) == (1.0, 75.0, 25.0)
    other = Meter()
    other.load_state_dict(meter.state_dict())
    assert other.state_dict() == meter.state_dict()


def _published_sgd_step(params, grads, buffers, lr, momentum, weight_decay):
    """The published SGD.py: the momentum buffer is also the update, and weight decay is added to
    it in place after the momentum step (so the decay enters the buffer)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if buffers[i] is None:
            buffers[i] = g.clone()
        else:
            buffers[i].mul_(momentum).add_(g)
        buffers[i].add_(p, alpha=weight_decay)
        p.add_(buffers[i], alpha=-lr)


def test_published_sgd_is_torch_sgd():
    torch.manual_seed(0)
    theirs = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    ours = [p.clone().requires_grad_() for p in theirs]
    optimizer = torch.optim.SGD(ours, lr=0.1, momentum=0.9, dampening=0, weight_decay=1e-4)
    buffers = [None, None]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in theirs]
        _published_sgd_step(theirs, grads, buffers, 0.1, 0.9, 1e-4)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        optimizer.step()
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
