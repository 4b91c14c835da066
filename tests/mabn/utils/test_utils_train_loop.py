"""mabn.utils.train_loop: hook order, stop requests, exceptions, and the stock hooks."""
from __future__ import annotations

import pytest
import torch

from mabn.utils.signals import StopFlag
from mabn.utils.train_loop import (CallbackHook, CheckpointHook, EvalHook, HookBase, LRSchedulerHook,
                                   StatisticsHook, TrainerBase)


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
