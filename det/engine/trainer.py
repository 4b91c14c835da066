"""The detection training step and the hooks around it (log line, checkpoints, evaluation).

One step (:meth:`mabn.utils.train_loop.SimpleTrainer.run_step`, which :class:`DetectionTrainer`
feeds): the forward returns torchvision's loss dict, the backward follows at once (DDP averages the
gradients, or :class:`~mabn.utils.distributed.GradientAveraging` after it), with no wait for the
host in between. Then ONE small all-reduce of ``[each loss / world size, non-finite flag, stop
flag]``, read back once, gives the logged averages over processes and lets every rank take the same
decision before the optimizer step: a NaN/Inf loss on any rank stops all of them (no update,
nothing is saved, the last good checkpoint stays), a SIGTERM/SIGINT on any rank makes all of them
finish the step, save ``model_{iter:07d}.pth`` and exit. The loop and the hook plumbing are
:mod:`mabn.utils.train_loop`'s.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from det.engine.checkpoint import CheckpointWriter
from det.engine.metric_logger import MetricLogger, max_memory_mib
from mabn.utils.amp import Precision
from mabn.utils.distributed import DistEnv
from mabn.utils.errors import UserError
from mabn.utils.run_log import MetricsFile, RunLog
from mabn.utils.signals import StopFlag
from mabn.utils.train_loop import CheckpointHook, EvalHook, HookBase, LRSchedulerHook, SimpleTrainer, TrainerBase

__all__ = ["DTYPES", "precision_from_dtype", "DetectionTrainer", "LogHook", "PeriodicCheckpoint", "MetricsWriter",
           "build_hooks"]

DTYPES = ("float32", "float16")
LOG_PERIOD = 20


def precision_from_dtype(dtype: str, device: torch.device) -> Precision:
    """``DTYPE float16``: mixed precision (float16 autocast with loss scaling on CUDA, bfloat16
    autocast on the CPU, see :mod:`mabn.utils.amp`); ``float32``: off."""
    if dtype not in DTYPES:
        raise UserError(f"DTYPE {dtype!r}: use one of {', '.join(DTYPES)}")
    return Precision(dtype == "float16", device)


def _to_device(targets: List[Mapping[str, torch.Tensor]], device: torch.device) -> List[Dict[str, torch.Tensor]]:
    return [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets]


class DetectionTrainer(SimpleTrainer):
    """Trains ``model`` (the data-parallel wrapper, or the network itself) on the batches of
    ``loader`` (``(images, targets, indices)``, one per iteration from the start iteration on).
    The step is :class:`~mabn.utils.train_loop.SimpleTrainer`'s: the model returns its loss dict.

    After a step, ``losses`` holds the step's losses averaged over processes (``loss`` is their
    sum) and ``step_time`` / ``data_time`` its durations.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, env: DistEnv,
                 precision: Precision, stop_flag: Optional[StopFlag] = None):
        super().__init__(model, optimizer, loader, env, precision, stop_flag)
        self.loader = loader
        self.losses: Dict[str, float] = {}

    def next_batch(self):
        images, targets, _ = super().next_batch()
        device = self.env.device
        return [image.to(device, non_blocking=True) for image in images], _to_device(targets, device)

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, targets = batch
        return self.model(images, targets)

    def after_update(self, sums: List[float], losses: Dict[str, torch.Tensor]) -> None:
        averages = dict(zip(losses, sums))  # the default summed_values: each loss averaged over processes
        self.losses = {"loss": sum(averages.values()), **averages}


class LogHook(HookBase):
    """Meters after every step; every :data:`LOG_PERIOD` iterations (and after the last) the
    published log line and TensorBoard scalars; a tqdm bar on rank 0. Register it before the
    scheduler hook: it logs the rate the step used."""

    def __init__(self, log: RunLog, period: int = LOG_PERIOD):
        self.log = log
        self.period = period
        self.meters = MetricLogger()
        self.bar = None

    def before_train(self) -> None:
        self.bar = self.log.progress(self.trainer.max_iter, self.trainer.start_iter, "train")

    def after_step(self) -> None:
        trainer: DetectionTrainer = self.trainer  # type: ignore[assignment]
        self.meters.update(**trainer.losses, time=trainer.step_time, data=trainer.data_time)
        if self.bar is not None:
            self.bar.update()
        if trainer.iter % self.period and trainer.iter != trainer.max_iter:
            return
        lr = trainer.optimizer.param_groups[0]["lr"]
        self.log.info(self.meters.line(trainer.iter, trainer.max_iter, lr, max_memory_mib(trainer.env.device)))
        self.log.scalars({f"train/{name}": value for name, value in trainer.losses.items()}, trainer.iter)
        self.log.scalars({"train/lr": lr, "train/time": trainer.step_time}, trainer.iter)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PeriodicCheckpoint:
    """What :class:`~mabn.utils.train_loop.CheckpointHook` calls: ``model_{iter:07d}`` every
    ``period`` iterations and after a stop, ``model_final`` after the last iteration."""

    def __init__(self, writer: CheckpointWriter, trainer: DetectionTrainer, period: int):
        self.writer = writer
        self.trainer = trainer
        self.period = period

    def due(self, trainer: TrainerBase) -> bool:
        return trainer.iter % self.period == 0 or trainer.iter == trainer.max_iter

    def __call__(self) -> None:
        iteration = self.trainer.iter
        if (iteration % self.period == 0 or self.trainer.stopped) and self.writer.last_iteration != iteration:
            self.writer(f"model_{iteration:07d}", iteration)
        if iteration == self.trainer.max_iter and not self.trainer.stopped:
            self.writer("model_final", iteration)


class MetricsWriter(MetricsFile):
    """``OUTPUT_DIR/metrics.json``: a list of ``{"iteration": i, "<dataset>": {"bbox": {"AP": ...},
    "segm": {...}}}``, one entry per evaluation (:class:`mabn.utils.run_log.MetricsFile`: rank 0
    writes, atomically; a resumed run drops an earlier run's entries after ``start_iter``), plus
    TensorBoard scalars ``eval/<dataset>/<bbox|segm>_<metric>``."""

    def __init__(self, output_dir: str, log: RunLog, start_iter: int, is_main: bool):
        super().__init__(os.path.join(output_dir, "metrics.json"), "iteration", start_iter, is_main)
        self.log = log

    def __call__(self, iteration: int, metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        if not self.is_main:
            return
        self.record(iteration, metrics)
        for dataset, per_type in metrics.items():
            for iou_type, values in per_type.items():
                self.log.scalars({f"eval/{dataset}/{iou_type}_{name}": value for name, value in values.items()},
                                 iteration)


def build_hooks(trainer: DetectionTrainer, scheduler, log: RunLog, checkpoint: PeriodicCheckpoint,
                evaluate: Optional[Callable[[], object]], test_period: int) -> List[Optional[HookBase]]:
    """Log line (before the scheduler), schedule, checkpoints, periodic evaluation."""
    return [
        LogHook(log),
        LRSchedulerHook(scheduler),
        CheckpointHook(checkpoint, checkpoint.due),
        EvalHook(evaluate, lambda t: t.iter % test_period == 0) if evaluate is not None and test_period > 0 else None,
    ]
