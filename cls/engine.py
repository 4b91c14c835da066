"""The classification training step, its epoch bookkeeping and the evaluation.

One step (:class:`mabn.utils.train_loop.SimpleTrainer`'s, which :class:`Trainer` feeds): forward,
label-smoothing loss, backward (DDP averages the gradients), then ONE small all-reduce of
``[loss * n, top-1 hits, top-5 hits, n, non-finite flag, stop flag]``, which gives the logged
global averages and lets every rank take the same decision: a NaN/Inf loss on any rank stops all
of them before the optimizer step (nothing is saved, the last checkpoint stays), a SIGTERM/SIGINT
on any rank makes all of them finish the step, save a checkpoint that resumes exactly there and
exit. The loop itself and the hooks (checkpoint, evaluation, learning-rate schedule, statistics)
come from :mod:`mabn.utils.train_loop`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

import mabn
from cls.metrics import Meter, label_smoothing_loss, topk_correct
from cls.run_log import test_line, train_line
from mabn.utils.amp import Precision
from mabn.utils.distributed import DistEnv, rank0_buffers
from mabn.utils.run_log import MetricsFile, RunLog
from mabn.utils.signals import StopFlag
from mabn.utils.train_loop import HookBase, SimpleTrainer

__all__ = ["TrainState", "Trainer", "Evaluator", "EpochLogHook", "MetricsWriter", "METRICS_NAME"]

METRICS_NAME = "metrics.json"


@dataclass
class TrainState:
    """Where training stands; what a checkpoint stores to resume exactly."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # completed iterations of epoch + 1
    global_step: int = 0
    meter: Meter = field(default_factory=Meter)  # running sums of the current epoch


class Trainer(SimpleTrainer):
    """Steps through epochs of ``iters_per_epoch`` batches of ``loader`` (whose batch sampler has
    ``set_epoch(epoch, start_step)``), updating ``state``. ``model`` is what the forward runs
    (DDP or :class:`~mabn.utils.distributed.GradientAveraging` around the network, or the network).
    The step is :class:`~mabn.utils.train_loop.SimpleTrainer`'s; its one all-reduce sums
    ``[loss * n, top-1 hits, top-5 hits, n]`` (:meth:`summed_values`).

    After a step, ``epoch_finished`` tells the hooks that it was the last of an epoch; ``state``
    then already counts the epoch, and ``finished_meter`` holds its sums.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, env: DistEnv,
                 iters_per_epoch: int, state: TrainState, precision: Precision, stop_flag: Optional[StopFlag] = None):
        super().__init__(model, optimizer, loader, env, precision, stop_flag)
        self.loader = loader
        self.iters_per_epoch = iters_per_epoch
        self.state = state
        self.epoch_finished = False
        self.finished_meter = Meter()
        self.step_sums: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 1.0)  # loss*n, top-1, top-5, n
        self.step_grad_scale = 1.0

    def train_epochs(self, total_epochs: int) -> bool:
        """Train up to ``total_epochs``; False when a stop request ended it early (after saving)."""
        remaining = (total_epochs - self.state.epoch) * self.iters_per_epoch - self.state.step_in_epoch
        self.model.train()
        return self.train(self.state.global_step, self.state.global_step + max(0, remaining))

    def batches(self) -> Iterator:
        """The rest of the current epoch, from ``state``."""
        self.loader.batch_sampler.set_epoch(self.state.epoch + 1, self.state.step_in_epoch)
        return iter(self.loader)

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = super().next_batch()
        return images.to(self.env.device, non_blocking=True), targets.to(self.env.device, non_blocking=True)

    def forward(self, batch: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.model(batch[0])

    def loss_dict(self, batch, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": label_smoothing_loss(logits, batch[1])}

    def after_backward(self) -> None:
        self.step_grad_scale = self.precision.grad_scale

    def summed_values(self, batch, logits: torch.Tensor, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch[1]
        n = float(targets.shape[0])
        hits = topk_correct(logits.detach(), targets)
        return torch.stack([losses["loss"].detach().double() * n, hits[0], hits[1],
                            torch.tensor(n, dtype=torch.float64, device=self.env.device)])

    def non_finite_message(self, losses: Dict[str, torch.Tensor], processes: int) -> str:
        state = self.state
        return (f"non-finite training loss ({losses['loss'].item()} on rank {self.env.rank}; non-finite on "
                f"{processes} of {self.env.world_size} processes) at epoch {state.epoch + 1}, iteration "
                f"{state.step_in_epoch + 1}/{self.iters_per_epoch} (global step {state.global_step + 1})")

    def after_update(self, sums: List[float], losses: Dict[str, torch.Tensor]) -> None:
        state = self.state
        self.step_sums = tuple(sums)
        state.meter.add(*sums)
        state.step_in_epoch += 1
        state.global_step += 1
        self.epoch_finished = state.step_in_epoch == self.iters_per_epoch
        if self.epoch_finished:
            state.epoch += 1
            state.step_in_epoch = 0
            self.finished_meter, state.meter = state.meter, Meter()
            self.restart_batches()


class EpochLogHook(HookBase):
    """Training scalars every ``log_interval`` steps; at the end of an epoch the published TRAIN
    line (with the rate used during the epoch: register before the scheduler hook), the epoch
    scalars and the number of skipped statistics updates summed over processes."""

    def __init__(self, log: RunLog, network: nn.Module, log_interval: int):
        self.log = log
        self.network = network
        self.log_interval = log_interval

    def after_step(self) -> None:
        trainer: Trainer = self.trainer  # type: ignore[assignment]
        lr = trainer.optimizer.param_groups[0]["lr"]
        if trainer.iter % self.log_interval == 0:
            loss_sum, top1, top5, count = trainer.step_sums
            self.log.scalars({"train/loss": loss_sum / count, "train/top1_err": 100.0 * (1 - top1 / count),
                              "train/top5_err": 100.0 * (1 - top5 / count), "train/lr": lr}, trainer.iter)
        if not trainer.epoch_finished:
            return
        epoch, meter = trainer.state.epoch, trainer.finished_meter
        self.log.info(train_line(epoch, lr, meter.loss, meter.top1_err, meter.top5_err))
        self.log.scalars({"epoch/train_loss": meter.loss, "epoch/train_top1_err": meter.top1_err,
                          "epoch/train_top5_err": meter.top5_err, "epoch/lr": lr}, epoch)
        if any(name.endswith("skipped_updates") for name, _ in self.network.named_buffers()):
            local = mabn.skipped_updates(self.network).to(trainer.env.device, torch.float64)
            skipped = int(trainer.env.all_reduce_sum(local).item())
            self.log.info(f"Epoch {epoch}: {skipped} statistics updates skipped so far (non-finite batches, "
                          f"summed over layers and processes)")
            self.log.scalar("epoch/skipped_updates", skipped, epoch)


class MetricsWriter(MetricsFile):
    """``<save>/metrics.json``: a list of ``{"epoch": e, "loss": ..., "top1_err": ...,
    "top5_err": ...}`` (completed epochs; errors in percent, as in the TEST line), one entry per
    epoch evaluated (:class:`mabn.utils.run_log.MetricsFile`: rank 0 writes, atomically; a
    resumed run drops an earlier run's entries after ``start_epoch``)."""

    def __init__(self, save: str, start_epoch: int, is_main: bool):
        super().__init__(os.path.join(save, METRICS_NAME), "epoch", start_epoch, is_main)

    def __call__(self, epoch: int, meter: Meter) -> None:
        self.record(epoch, {"loss": meter.loss, "top1_err": meter.top1_err, "top5_err": meter.top5_err})


class Evaluator:
    """Loss and top-1/top-5 error over the whole validation set (sharded, summed over ranks).

    Every rank evaluates with rank 0's normalization statistics (the ones a checkpoint's
    ``model`` holds), so the result equals a ``--test_only`` run on that checkpoint. With
    ``metrics`` (a :class:`MetricsWriter`), an evaluation at an epoch (``step``) is recorded there.
    """

    def __init__(self, network: nn.Module, loader: DataLoader, env: DistEnv, precision: Precision, log: RunLog,
                 metrics: Optional[MetricsWriter] = None):
        self.network = network
        self.loader = loader
        self.env = env
        self.precision = precision
        self.log = log
        self.metrics = metrics

    @torch.no_grad()
    def __call__(self, step: Optional[int] = None) -> Meter:
        """Evaluate, log the TEST line (and TensorBoard scalars and the ``metrics`` entry at epoch
        ``step``) and return the sums."""
        model, device = self.network, self.env.device
        was_training = model.training
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        with rank0_buffers(model, self.env), \
                contextlib.closing(self.log.progress(len(self.loader), 0, "test")) as progress:
            model.eval()
            for images, targets in self.loader:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with self.precision.autocast():
                    logits = model(images)
                sums[0] += label_smoothing_loss(logits, targets, reduction="sum").double()
                sums[1:3] += topk_correct(logits, targets)
                sums[3] += targets.shape[0]
                progress.update()
        model.train(was_training)
        meter = Meter()
        meter.add(*self.env.all_reduce_sum(sums).tolist())
        self.log.info(test_line(meter.loss, meter.top1_err, meter.top5_err))
        if step is not None:
            self.log.scalars({"test/loss": meter.loss, "test/top1_err": meter.top1_err,
                              "test/top5_err": meter.top5_err}, step)
            if self.metrics is not None:
                self.metrics(step, meter)
        return meter
