"""mabn.utils.amp.Precision on the CPU: off is plain float32, on is bfloat16 autocast without scaling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mabn.utils.amp import Precision


@pytest.mark.parametrize("enabled,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_precision_on_the_cpu(enabled, dtype):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision(enabled, torch.device("cpu"))
    before = model.weight.detach().clone()
    with precision.autocast():
        output = model(torch.randn(3, 4))
    assert output.dtype == dtype and precision.scaler is None and precision.grad_scale == 1.0
    precision.backward(output.float().pow(2).mean())
    precision.step(optimizer)
    assert not torch.equal(model.weight, before)
