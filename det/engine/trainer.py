"""The detection training step and the hooks around it (log line, checkpoints, evaluation).

One step (:meth:`DetectionTrainer.run_step`): the forward returns torchvision's loss dict, the
backward follows at once (DDP averages the gradients, or
:class:`~mabn.utils.distributed.GradientAveraging` after it), with no wait for the host in between.
Then ONE small all-reduce of ``[each loss / world size, non-finite flag, stop flag]``, read back
once, gives the logged averages over processes and lets every rank take the same decision before
the optimizer step: a NaN/Inf loss on any rank stops all of them (no update, nothing is saved, the
last good checkpoint stays), a SIGTERM/SIGINT on any rank makes all of them finish the step, save
``model_{iter:07d}.pth`` and exit. The loop and the hook plumbing are
:mod:`mabn.utils.train_loop`'s.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from det.engine.checkpoint import CheckpointWriter
from det.engine.metric_logger import MetricLogger, max_memory_mib
from mabn.utils.amp import Precision
from mabn.utils.checkpoint import write_text_atomic
from mabn.utils.distributed import DistEnv
from mabn.utils.errors import NonFiniteLossError, UserError
from mabn.utils.run_log import RunLog
from mabn.utils.signals import StopFlag
from mabn.utils.train_loop import CheckpointHook, EvalHook, HookBase, LRSchedulerHook, TrainerBase

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


class DetectionTrainer(TrainerBase):
    """Trains ``model`` (the data-parallel wrapper, or the network itself) on the batches of
    ``loader`` (``(images, targets, indices)``, one per iteration from the start iteration on).

    After a step, ``losses`` holds the step's losses averaged over processes (``loss`` is their
    sum) and ``step_time`` / ``data_time`` its durations.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, env: DistEnv,
                 precision: Precision, stop_flag: Optional[StopFlag] = None):
        super().__init__(stop_flag)
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.env = env
        self.precision = precision
        self.losses: Dict[str, float] = {}
        self.step_time = 0.0
        self.data_time = 0.0
        self._batches: Optional[Iterator] = None
        self._stop_agreed = False

    def stop_requested(self) -> bool:
        return self._stop_agreed

    def train(self, start_iter: int, max_iter: int) -> bool:
        try:
            return super().train(start_iter, max_iter)
        finally:
            # Shut the loader's workers down now rather than at exit: they outlive a job-wide
            # SIGTERM (the trainer handles it) and end only when their loader ends them.
            self._batches = None

    def run_step(self) -> None:
        start = time.perf_counter()
        if self._batches is None:
            self._batches = iter(self.loader)
        images, targets, _ = next(self._batches)
        device = self.env.device
        images = [image.to(device, non_blocking=True) for image in images]
        targets = _to_device(targets, device)
        data_time = time.perf_counter() - start
        self.precision.before_forward()
        with self.precision.autocast():
            loss_dict = self.model(images, targets)
        names = list(loss_dict)
        total = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(total)
        if hasattr(self.model, "average_gradients"):
            self.model.average_gradients()
        # Everything up to the all-reduce stays on the device: the first read on the host is the
        # summary's tolist(), after the backward has been queued.
        local = torch.stack([loss_dict[name].detach().double() for name in names])
        non_finite = (~torch.isfinite(total.detach())).double().reshape(1)
        stop = local.new_full((1,), float(self.stop_flag.requested))
        summary = torch.cat([local / self.env.world_size, non_finite, stop])
        values = self.env.all_reduce_sum(summary).tolist()
        if values[-2] > 0:
            shown = ", ".join(f"{name} {loss_dict[name].item():.4g}" for name in names)
            raise NonFiniteLossError(f"non-finite training loss at iteration {self.iter + 1} (on rank {self.env.rank}: "
                                     f"{shown}; non-finite on {int(values[-2])} of {self.env.world_size} processes)")
        self.precision.step(self.optimizer)
        self._stop_agreed = values[-1] > 0
        self.losses = dict(zip(names, values[:len(names)]))
        self.losses = {"loss": sum(self.losses.values()), **self.losses}
        self.data_time = data_time
        self.step_time = time.perf_counter() - start


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


class MetricsWriter:
    """``OUTPUT_DIR/metrics.json``: a list of ``{"iteration": i, "<dataset>": {"bbox": {"AP": ...},
    "segm": {...}}}``, one entry per evaluation, plus TensorBoard scalars
    ``eval/<dataset>/<bbox|segm>_<metric>`` (rank 0 writes). Entries after ``start_iter`` from an
    earlier run that is being resumed are dropped."""

    def __init__(self, output_dir: str, log: RunLog, start_iter: int, is_main: bool):
        self.path = os.path.join(output_dir, "metrics.json")
        self.log = log
        self.is_main = is_main
        self.entries: List[dict] = []
        if is_main and os.path.isfile(self.path):
            try:
                with open(self.path) as stream:
                    entries = json.load(stream)
                self.entries = [e for e in entries if isinstance(e, dict) and e.get("iteration", 0) <= start_iter]
            except (OSError, ValueError):
                self.entries = []

    def __call__(self, iteration: int, metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        if not self.is_main:
            return
        self.entries = [e for e in self.entries if e.get("iteration") != iteration]
        self.entries.append({"iteration": iteration, **metrics})
        write_text_atomic(self.path, json.dumps(self.entries, indent=1))
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
