"""A small training loop with hooks, shared by the trainers (``cls``, ``det``).

:class:`TrainerBase` runs ``run_step`` from ``iter`` to ``max_iter`` and calls its hooks around
the loop and every step, in the order they were registered::

    before_train()
    for each step: before_step(); run_step(); iter += 1; after_step()
    after_train()        # after the last step, or after a step that honoured a stop request

A subclass implements ``run_step`` and may override :meth:`TrainerBase.stop_requested` (the
default reads a :class:`~mabn.utils.signals.StopFlag`; a distributed trainer returns the
decision all ranks agreed on). An exception ends the loop without ``after_train``, so a failed
run saves nothing; releasing resources is the caller's job (context managers).

The hooks here take callables and predicates, so that each trainer decides *what* to save,
evaluate or record and *when* (every N epochs, every N iterations) without subclassing.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

from mabn.utils.signals import StopFlag

__all__ = ["HookBase", "TrainerBase", "CallbackHook", "CheckpointHook", "EvalHook", "LRSchedulerHook",
           "StatisticsHook"]

Predicate = Callable[["TrainerBase"], bool]


class HookBase:
    """Does nothing at every point of the loop; subclasses override what they need.
    ``self.trainer`` is set by :meth:`TrainerBase.register_hooks`."""

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class TrainerBase:
    """``iter`` counts completed steps; :meth:`train` returns True when ``max_iter`` was reached
    and False when a stop request ended the loop early (``stopped`` is then True)."""

    def __init__(self, stop_flag: Optional[StopFlag] = None):
        self.hooks: List[HookBase] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.stopped = False
        self.stop_flag = stop_flag or StopFlag()

    def register_hooks(self, hooks: Iterable[Optional[HookBase]]) -> None:
        """Append ``hooks`` (None entries are skipped), in calling order."""
        for hook in hooks:
            if hook is not None:
                hook.trainer = self
                self.hooks.append(hook)

    def stop_requested(self) -> bool:
        """Read once after every step; True ends the loop (``after_train`` still runs)."""
        return self.stop_flag.requested

    def run_step(self) -> None:
        raise NotImplementedError

    def train(self, start_iter: int, max_iter: int) -> bool:
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.stopped = False
        self._call("before_train")
        while self.iter < self.max_iter:
            self._call("before_step")
            self.run_step()
            self.iter += 1
            self._call("after_step")
            if self.stop_requested():
                self.stopped = True
                break
        self._call("after_train")
        return not self.stopped

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()


def _always(trainer: TrainerBase) -> bool:
    return True


class CallbackHook(HookBase):
    """``callback(trainer)`` after every step for which ``when(trainer)`` holds."""

    def __init__(self, callback: Callable[[TrainerBase], None], when: Predicate = _always):
        self.callback = callback
        self.when = when

    def after_step(self) -> None:
        if self.when(self.trainer):
            self.callback(self.trainer)


class LRSchedulerHook(CallbackHook):
    """``scheduler.step()`` after the steps selected by ``when`` (e.g. the last of an epoch)."""

    def __init__(self, scheduler, when: Predicate = _always):
        super().__init__(lambda trainer: scheduler.step(), when)
        self.scheduler = scheduler


class CheckpointHook(CallbackHook):
    """``save()`` after the steps selected by ``when``, and once more when a stop request ended
    the loop (so that the run resumes exactly where it stopped)."""

    def __init__(self, save: Callable[[], None], when: Predicate):
        super().__init__(lambda trainer: save(), when)
        self.save = save

    def after_train(self) -> None:
        if self.trainer.stopped:
            self.save()


class EvalHook(CallbackHook):
    """``evaluate()`` after the steps selected by ``when``; not after the last step (the caller
    evaluates the final model itself) nor after a stop."""

    def __init__(self, evaluate: Callable[[], object], when: Predicate):
        super().__init__(lambda trainer: evaluate(), lambda trainer: trainer.iter < trainer.max_iter and when(trainer))
        self.evaluate = evaluate


class StatisticsHook(HookBase):
    """Drives a statistics recorder with ``set_step(step)`` before and ``flush()`` after every
    step (``grad_scale()`` is passed to ``flush`` for AMP) and ``close()`` after training."""

    def __init__(self, recorder, grad_scale: Callable[[], float] = lambda: 1.0):
        self.recorder = recorder
        self.grad_scale = grad_scale

    def before_step(self) -> None:
        self.recorder.set_step(self.trainer.iter)

    def after_step(self) -> None:
        self.recorder.flush(self.grad_scale())

    def after_train(self) -> None:
        self.recorder.close()
