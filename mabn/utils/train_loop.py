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

:class:`SimpleTrainer` is the data-parallel training step both trainers run (after detectron2's
``SimpleTrainer.run_step``); the application supplies the batches, the forward and the losses
through the methods listed in its docstring.

The hooks here take callables and predicates, so that each trainer decides *what* to save,
evaluate or record and *when* (every N epochs, every N iterations) without subclassing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from mabn.utils.distributed import DistEnv, average_gradients
from mabn.utils.errors import NonFiniteLossError
from mabn.utils.signals import StopFlag

if TYPE_CHECKING:
    from mabn.utils.amp import Precision

__all__ = ["HookBase", "TrainerBase", "SimpleTrainer", "CallbackHook", "CheckpointHook", "EvalHook",
           "LRSchedulerHook", "StatisticsHook"]

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


class SimpleTrainer(TrainerBase):
    """One data-parallel training step per iteration, the same for every application::

        batch = next_batch()                        # data_time: how long this took
        precision.before_forward()
        with precision.autocast(): outputs = forward(batch)
        losses = loss_dict(batch, outputs)          # {name: 0-dim tensor}
        optimizer.zero_grad(); precision.backward(sum of losses)
        average_gradients(model); after_backward()  # GradientAveraging's all-reduce (DDP: done)
        values = summed_values(batch, outputs, losses)
        ONE all-reduce of [values..., non-finite flag, stop flag], ONE .tolist()
        any rank non-finite: raise NonFiniteLossError(non_finite_message(losses, count))
        precision.step(optimizer); agree on the stop flag
        after_update(summed values, losses)         # step_time: the whole step

    Nothing reads a tensor on the host between the forward and the all-reduce's ``tolist()``
    (unless an application hook does), so on CUDA the backward is queued at once. A NaN/Inf loss
    on any rank stops every rank before the optimizer step (the parameters are not updated); a
    stop request on any rank (``stop_flag``) ends the loop on every rank after the same step.

    The application supplies (only :meth:`forward` is required):

    * :meth:`forward` -- the model's forward on a batch, run under autocast;
    * :meth:`loss_dict` -- the losses (the default: ``forward`` returned them, as detection
      models do); their sum is backpropagated;
    * :meth:`summed_values` -- per-process float64 values summed over processes in the same
      all-reduce (the default: each loss divided by the world size, so the sums are the averages
      over processes, in the order of ``loss_dict``), and :meth:`after_update`, which receives
      the sums once the step is taken;
    * :meth:`next_batch` / :meth:`batches` -- where the batches come from (the default iterates
      ``data`` once; :meth:`restart_batches` makes the next step start a new iterator);
    * :meth:`non_finite_message` -- the error message, and :meth:`after_backward`.

    The iterator is dropped when :meth:`train` ends, however it ends, so that the loader's workers
    shut down then (they outlive a job-wide SIGTERM, which the trainer handles, and end only when
    their loader ends them).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Iterable, env: DistEnv,
                 precision: "Precision", stop_flag: Optional[StopFlag] = None):
        super().__init__(stop_flag)
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.env = env
        self.precision = precision
        self.data_time = 0.0
        self.step_time = 0.0
        self._batches: Optional[Iterator] = None
        self._stop_agreed = False

    # -- what the application supplies -------------------------------------------------------------

    def batches(self) -> Iterator:
        """A new iterator over the training batches (the default: ``iter(self.data)``)."""
        return iter(self.data)

    def next_batch(self) -> Any:
        """The next batch, as :meth:`forward` takes it; an override that moves it to the device
        calls ``super().next_batch()`` (the time this takes is ``data_time``)."""
        if self._batches is None:
            self._batches = self.batches()
        return next(self._batches)

    def restart_batches(self) -> None:
        """Make the next step start a new iterator from :meth:`batches`."""
        self._batches = None

    def forward(self, batch: Any) -> Any:
        """The model's forward on ``batch`` (under ``precision.autocast()``)."""
        raise NotImplementedError

    def loss_dict(self, batch: Any, outputs: Any) -> Dict[str, torch.Tensor]:
        """The 0-dim losses of the step (outside autocast); the default is ``outputs`` itself."""
        return outputs

    def after_backward(self) -> None:
        """Called after the backward and the gradient averaging, before :meth:`summed_values`."""

    def summed_values(self, batch: Any, outputs: Any, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """A 1-dim float64 tensor (on the collective's device) of values summed over processes in
        the step's one all-reduce, computed after the backward. The default: each loss divided by
        the world size (the sums are the averages over processes, in the order of ``losses``)."""
        return torch.stack([loss.detach().double() for loss in losses.values()]) / self.env.world_size

    def after_update(self, sums: List[float], losses: Dict[str, torch.Tensor]) -> None:
        """Called after the optimizer step with the all-reduced :meth:`summed_values` (``losses``:
        this rank's, as :meth:`loss_dict` returned them)."""

    def non_finite_message(self, losses: Dict[str, torch.Tensor], processes: int) -> str:
        """The message of the :class:`NonFiniteLossError` when ``processes`` ranks saw a NaN/Inf loss
        (``losses``: this rank's). The default names the iteration, this rank's losses and the count."""
        shown = ", ".join(f"{name} {loss.item():.4g}" for name, loss in losses.items())
        return (f"non-finite training loss at iteration {self.iter + 1} (on rank {self.env.rank}: {shown}; "
                f"non-finite on {processes} of {self.env.world_size} processes)")

    # -- the step ----------------------------------------------------------------------------------

    def stop_requested(self) -> bool:
        """Whether any rank's ``stop_flag`` was set during the last step (all ranks agree)."""
        return self._stop_agreed

    def train(self, start_iter: int, max_iter: int) -> bool:
        try:
            return super().train(start_iter, max_iter)
        finally:
            self.restart_batches()

    def run_step(self) -> None:
        start = time.perf_counter()
        batch = self.next_batch()
        data_time = time.perf_counter() - start
        self.precision.before_forward()
        with self.precision.autocast():
            outputs = self.forward(batch)
        losses = self.loss_dict(batch, outputs)
        total = _sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(total)
        average_gradients(self.model)
        self.after_backward()
        values = self.summed_values(batch, outputs, losses)
        non_finite = (~torch.isfinite(total.detach())).to(values.dtype).reshape(1)
        stop = values.new_full((1,), float(self.stop_flag.requested))
        *sums, non_finite_count, stop_count = self.env.all_reduce_sum(torch.cat([values, non_finite, stop])).tolist()
        if non_finite_count > 0:
            raise NonFiniteLossError(self.non_finite_message(losses, int(non_finite_count)))
        self.precision.step(self.optimizer)
        self._stop_agreed = stop_count > 0
        self.data_time = data_time
        self.after_update(sums, losses)
        self.step_time = time.perf_counter() - start


def _sum(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """``a + b + ...`` (a single loss is returned as it is)."""
    iterator = iter(values)
    total = next(iterator, None)
    if total is None:
        raise ValueError("loss_dict returned no losses")
    for value in iterator:
        total = total + value
    return total


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
