"""mabn.utils.train_loop: hook order, stop requests, exceptions, the stock hooks, and the
training step of SimpleTrainer on a toy model (one all-reduce, non-finite losses, stop agreement,
no host sync before the backward)."""
from __future__ import annotations

import math
from typing import List

import pytest
import torch
from torch import nn

import mabn.utils.train_loop as train_loop
from mabn.utils.amp import Precision
from mabn.utils.distributed import DistEnv
from mabn.utils.errors import NonFiniteLossError
from mabn.utils.signals import StopFlag
from mabn.utils.train_loop import (CallbackHook, CheckpointHook, EvalHook, HookBase, LRSchedulerHook,
                                   SimpleTrainer, StatisticsHook, TrainerBase)


class Recorder(HookBase):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def before_train(self):
        self.calls.append((self.name, "before_train", self.trainer.iter))

    def after_train(self):
        self.calls.append((self.name, "after_train", self.trainer.iter))

    def before_step(self):
        self.calls.append((self.name, "before_step", self.trainer.iter))

    def after_step(self):
        self.calls.append((self.name, "after_step", self.trainer.iter))


class Counting(TrainerBase):
    def __init__(self, stop_at=None, fail_at=None):
        super().__init__(StopFlag())
        self.steps, self.stop_at, self.fail_at = [], stop_at, fail_at

    def run_step(self):
        if self.iter == self.fail_at:
            raise ValueError("step failed")
        self.steps.append(self.iter)
        if self.iter == self.stop_at:
            self.stop_flag.request("SIGTERM")


def test_hooks_run_in_order_around_every_step():
    calls = []
    trainer = Counting()
    trainer.register_hooks([Recorder("a", calls), None, Recorder("b", calls)])
    assert trainer.train(start_iter=2, max_iter=4) is True
    assert trainer.steps == [2, 3] and not trainer.stopped
    assert calls == [("a", "before_train", 2), ("b", "before_train", 2),
                     ("a", "before_step", 2), ("b", "before_step", 2), ("a", "after_step", 3), ("b", "after_step", 3),
                     ("a", "before_step", 3), ("b", "before_step", 3), ("a", "after_step", 4), ("b", "after_step", 4),
                     ("a", "after_train", 4), ("b", "after_train", 4)]


def test_a_stop_request_ends_after_the_step_and_checkpoints():
    saves = []
    trainer = Counting(stop_at=1)
    trainer.register_hooks([CheckpointHook(lambda: saves.append(trainer.iter), when=lambda t: t.iter % 10 == 0)])
    assert trainer.train(0, 10) is False
    assert trainer.steps == [0, 1] and trainer.stopped and saves == [2]


def test_an_exception_skips_after_train():
    saves, calls = [], []
    trainer = Counting(fail_at=2)
    trainer.register_hooks([Recorder("a", calls), CheckpointHook(lambda: saves.append(trainer.iter), lambda t: True)])
    with pytest.raises(ValueError):
        trainer.train(0, 5)
    assert saves == [1, 2] and ("a", "after_train", 2) not in calls


def test_periodic_hooks():
    evaluated, saved, seen = [], [], []
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = Counting()
    trainer.run_step = optimizer.step  # the scheduler steps after the optimizer, as torch expects
    trainer.register_hooks([
        LRSchedulerHook(scheduler, when=lambda t: t.iter % 2 == 0),
        CheckpointHook(lambda: saved.append(trainer.iter), when=lambda t: t.iter % 3 == 0),
        EvalHook(lambda: evaluated.append(trainer.iter), when=lambda t: t.iter % 2 == 0),
        CallbackHook(lambda t: seen.append(t.iter)),
    ])
    trainer.train(0, 6)
    assert optimizer.param_groups[0]["lr"] == 0.125  # stepped after iterations 2, 4 and 6
    assert saved == [3, 6] and evaluated == [2, 4]  # never after the last step: the caller evaluates
    assert seen == [1, 2, 3, 4, 5, 6]


def test_statistics_hook_drives_a_recorder():
    class FakeRecorder:
        def __init__(self):
            self.events = []

        def set_step(self, step):
            self.events.append(("set_step", step))

        def flush(self, scale):
            self.events.append(("flush", scale))

        def close(self):
            self.events.append(("close",))

    recorder = FakeRecorder()
    trainer = Counting()
    trainer.register_hooks([StatisticsHook(recorder, grad_scale=lambda: 4.0)])
    trainer.train(0, 2)
    assert recorder.events == [("set_step", 0), ("flush", 4.0), ("set_step", 1), ("flush", 4.0), ("close",)]


# -- SimpleTrainer ---------------------------------------------------------------------------------


class TwoRanks(DistEnv):
    """A world of 2 in one process: ``all_reduce_sum`` records what this rank sends and adds the
    other rank's values (``other(sent)``: the same as this rank's unless a test says otherwise)."""

    def __init__(self, other=None):
        super().__init__(world_size=2)
        self.sent: List[torch.Tensor] = []
        self.other = other or (lambda sent: sent.clone())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor.clone())
        return tensor.add_(self.other(tensor))


class ToyTrainer(SimpleTrainer):
    """``x -> Linear`` with two losses; the batches are 1-dim inputs, a NaN one where asked."""

    def __init__(self, env: DistEnv, steps: int = 3, nan_at: int = -1, extra: bool = False):
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        data = [torch.full((4, 2), math.nan if i == nan_at else float(i + 1)) for i in range(steps)]
        super().__init__(model, torch.optim.SGD(model.parameters(), lr=0.1), data, env,
                         Precision(False, torch.device("cpu")), StopFlag())
        self.extra = extra
        self.updates: List[tuple] = []
        self.events: List[str] = []

    def forward(self, batch):
        out = self.model(batch)
        return {"loss_a": out.square().mean(), "loss_b": out.abs().mean()}

    def after_backward(self):
        self.events.append("after_backward")

    def summed_values(self, batch, outputs, losses):
        values = super().summed_values(batch, outputs, losses)
        if not self.extra:
            return values
        return torch.cat([values, torch.tensor([float(batch.shape[0])], dtype=torch.float64)])

    def after_update(self, sums, losses):
        self.updates.append((list(sums), {name: loss.item() for name, loss in losses.items()}))


def test_a_step_backpropagates_the_sum_and_reduces_once():
    env = TwoRanks()
    trainer = ToyTrainer(env, steps=1, extra=True)
    reference = nn.Linear(2, 1)
    reference.load_state_dict(trainer.model.state_dict())
    batch = trainer.data[0]
    out = reference(batch)
    losses = [out.square().mean(), out.abs().mean()]
    (losses[0] + losses[1]).backward()
    expected = {name: p - 0.1 * p.grad for name, p in reference.named_parameters()}

    assert trainer.train(0, 1) and not trainer.stopped
    assert len(env.sent) == 1  # one all-reduce per step: [each loss / 2, n, non-finite, stop]
    sent = env.sent[0]
    assert sent.dtype == torch.float64 and sent.shape == (5,)
    assert sent[:2].tolist() == [losses[0].item() / 2, losses[1].item() / 2] and sent[2:].tolist() == [4, 0, 0]
    # Both ranks' sums (the other rank sent the same): each loss averaged over processes, n summed.
    assert trainer.updates == [([losses[0].item(), losses[1].item(), 8.0],
                                {"loss_a": losses[0].item(), "loss_b": losses[1].item()})]
    for name, parameter in trainer.model.named_parameters():
        assert torch.allclose(parameter, expected[name]), name
    assert trainer.data_time >= 0 and trainer.step_time >= trainer.data_time


def test_a_non_finite_loss_raises_before_the_optimizer_step():
    trainer = ToyTrainer(TwoRanks(), steps=3, nan_at=1)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.9)
    snapshots: List[dict] = []
    trainer.register_hooks([CallbackHook(lambda t: snapshots.append(
        {name: p.detach().clone() for name, p in t.model.named_parameters()}))])
    with pytest.raises(NonFiniteLossError, match=r"at iteration 2 \(on rank 0: loss_a nan, loss_b nan; "
                                                 r"non-finite on 2 of 2 processes\)"):
        trainer.train(0, 3)
    assert trainer.iter == 1 and len(trainer.updates) == 1 and len(snapshots) == 1  # step 1 taken, not step 2
    assert trainer.model.weight.grad.isnan().all()  # the backward ran, the update did not
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, snapshots[0][name]), name
    assert trainer._batches is None  # the iterator (a loader's workers) is dropped however train ends

    first = ToyTrainer(TwoRanks(), steps=1, nan_at=0)
    params = {name: p.detach().clone() for name, p in first.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="at iteration 1 "):
        first.train(0, 1)
    for name, parameter in first.model.named_parameters():
        assert torch.equal(parameter, params[name]), name
    assert not first.optimizer.state and first.updates == []


def test_a_non_finite_loss_on_another_rank_stops_this_one():
    def other(sent):
        theirs = sent.clone()
        theirs[-2] = 1.0  # the other rank's loss was NaN
        return theirs

    trainer = ToyTrainer(TwoRanks(other), steps=2)
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"on rank 0: loss_a [0-9.e+]+, loss_b [0-9.e+]+; "
                                                 r"non-finite on 1 of 2 processes"):
        trainer.train(0, 2)
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, params[name]), name


@pytest.mark.parametrize("here, there", [(True, False), (False, True), (True, True)])
def test_all_ranks_agree_to_stop_after_the_same_step(here, there):
    stops_there = there

    def other(sent):
        theirs = sent.clone()
        theirs[-1] = float(stops_there)
        return theirs

    trainer = ToyTrainer(TwoRanks(other), steps=5)
    saves: List[int] = []
    trainer.register_hooks([CheckpointHook(lambda: saves.append(trainer.iter), lambda t: False)])
    if here:
        trainer.stop_flag.request("SIGTERM")
    assert trainer.train(0, 5) is False
    assert trainer.stopped and trainer.iter == 1 and saves == [1] and len(trainer.updates) == 1


def test_no_stop_without_a_request_on_any_rank():
    trainer = ToyTrainer(TwoRanks(), steps=3)
    assert trainer.train(0, 3) and trainer.iter == 3 and not trainer.stopped


def test_the_step_order_without_a_host_sync_before_the_backward(monkeypatch, step_events):
    trainer = ToyTrainer(TwoRanks(), steps=2, extra=True)
    trainer.events = events = step_events.events
    forward, backward, step, reduce = trainer.forward, trainer.precision.backward, trainer.precision.step, \
        trainer.env.all_reduce_sum

    def recorded_forward(batch):
        losses = {name: step_events.track(loss) for name, loss in forward(batch).items()}
        events.append("forward")
        return losses

    def recorded_average(model):
        assert model is trainer.model
        events.append("average_gradients")

    trainer.forward = recorded_forward
    trainer.precision.backward = step_events.named("backward", backward)
    trainer.precision.step = step_events.named("step", step)
    trainer.env.all_reduce_sum = step_events.named("all_reduce", lambda tensor: step_events.track(reduce(tensor)))
    trainer.after_update = lambda sums, losses: events.append("after_update")
    monkeypatch.setattr(train_loop, "average_gradients", recorded_average)
    assert trainer.train(0, 2)
    one = ["forward", "backward", "average_gradients", "after_backward", "all_reduce", "tolist", "step",
           "after_update"]
    assert events == one * 2


def test_batches_come_from_the_app_and_restart_on_request():
    class Epochs(ToyTrainer):
        def __init__(self):
            super().__init__(DistEnv(), steps=2)
            self.started: List[int] = []

        def batches(self):
            self.started.append(self.iter)
            return iter(self.data)

        def after_update(self, sums, losses):
            super().after_update(sums, losses)
            if self.iter % 2 == 1:  # iter counts the steps before this one: an "epoch" of 2 steps
                self.restart_batches()

    trainer = Epochs()
    assert trainer.train(0, 6)
    assert trainer.started == [0, 2, 4] and trainer._batches is None
    # One process: the sums are this rank's losses themselves, in the order of the loss dict.
    assert len(trainer.updates) == 6
    assert all(sums == list(losses.values()) and list(losses) == ["loss_a", "loss_b"]
               for sums, losses in trainer.updates)


def test_the_app_formats_the_non_finite_message():
    class Described(ToyTrainer):
        def non_finite_message(self, losses, processes):
            return f"epoch 7: {sorted(losses)} on {processes} processes"

    with pytest.raises(NonFiniteLossError, match=r"^epoch 7: \['loss_a', 'loss_b'\] on 1 processes$"):
        Described(DistEnv(), steps=1, nan_at=0).train(0, 1)
