"""det.solver: bias groups, the warm-up multi-step schedule per iteration, resuming mid-schedule, bad values."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from det.config import load_config
from torch.optim.lr_scheduler import LambdaLR

from det.solver import make_lr_scheduler, make_optimizer
from mabn.utils.errors import UserError
from mabn.utils.lr_schedule import position_scheduler


def _config(*opts: str):
    return load_config(None, ["SOLVER.BASE_LR", "0.1", "SOLVER.STEPS", "(4, 6)", "SOLVER.WARMUP_ITERS", "2",
                              "SOLVER.WEIGHT_DECAY", "0.001", "SOLVER.WEIGHT_DECAY_BIAS", "0",
                              "SOLVER.BIAS_LR_FACTOR", "2", *opts])


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1, bias=False))
    model[0].weight.requires_grad_(False)
    return model


def _rates(scheduler: LambdaLR, steps: int):
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_bias_parameters_get_their_own_rate_and_weight_decay():
    model = _model()
    optimizer = make_optimizer(_config(), model)
    weights, biases = optimizer.param_groups
    assert {id(p) for p in biases["params"]} == {id(model[0].bias), id(model[1].bias)}
    assert {id(p) for p in weights["params"]} == {id(model[1].weight), id(model[2].weight)}  # frozen one left out
    assert (weights["lr"], weights["weight_decay"], weights["momentum"]) == (0.1, 0.001, 0.9)
    assert (biases["lr"], biases["weight_decay"]) == (0.2, 0.0)


@pytest.mark.parametrize("method, first", [("linear", [1 / 3, 2 / 3]), ("constant", [1 / 3, 1 / 3])])
def test_warmup_then_steps_per_iteration(method, first):
    scheduler = make_lr_scheduler(_config("SOLVER.WARMUP_METHOD", method), make_optimizer(_config(), _model()))
    factors = [rates[0] / 0.1 for rates in _rates(scheduler, 8)]
    assert factors == pytest.approx(first + [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert all(bias == pytest.approx(2 * weight) for weight, bias in _rates(scheduler, 2))


def test_a_resumed_schedule_continues_where_it_stopped():
    full = _rates(make_lr_scheduler(_config(), make_optimizer(_config(), _model())), 8)
    resumed = _rates(make_lr_scheduler(_config(), make_optimizer(_config(), _model()), start_iter=3), 5)
    assert torch.tensor(resumed).allclose(torch.tensor(full[3:]))


def test_positioning_needs_only_the_iteration_and_takes_new_base_rates():
    """What a resume does: the rates are exact, and a changed BASE_LR applies at once."""
    scheduler = make_lr_scheduler(_config(), make_optimizer(_config(), _model()))
    _rates(scheduler, 5)
    other = make_lr_scheduler(_config(), make_optimizer(_config(), _model()))
    position_scheduler(other, 5, [0.1, 0.2])
    assert other.last_epoch == 5 and _rates(other, 3) == _rates(scheduler, 3)
    position_scheduler(other, 5, [1.0, 2.0])
    assert [group["lr"] for group in other.optimizer.param_groups] == pytest.approx([0.1, 0.2])  # one step passed


@pytest.mark.parametrize("opts, message", [
    (("SOLVER.WARMUP_METHOD", "cosine"), "SOLVER.WARMUP_METHOD"),
    (("SOLVER.STEPS", "(6, 4)"), "SOLVER.STEPS"),
    (("SOLVER.BASE_LR", "0.0"), "SOLVER.BASE_LR"),
    (("SOLVER.WEIGHT_DECAY", "-1.0"), "SOLVER.WEIGHT_DECAY"),
])
def test_bad_solver_values_are_one_line_errors(opts, message):
    with pytest.raises(UserError, match=message):
        config = _config(*opts)
        make_lr_scheduler(config, make_optimizer(config, _model()))


def test_sgd_steps_with_these_groups():
    model = _model()
    optimizer = make_optimizer(_config(), model)
    model(torch.ones(2, 1, 3, 3)).sum().backward()
    before = model[1].bias.detach().clone()
    optimizer.step()
    assert torch.allclose(model[1].bias, before - 0.2 * model[1].bias.grad)
