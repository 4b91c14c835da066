"""Training and evaluation loops.

One iteration: forward, label-smoothing loss, backward (DDP averages the gradients), then ONE
small all-reduce of ``[loss * n, top-1 hits, top-5 hits, n, non-finite flag, stop flag]``, which
gives the logged global averages and lets every rank take the same decision: a NaN/Inf loss on
any rank stops all of them before the optimizer step (nothing is saved, the last checkpoint
stays), a SIGTERM on any rank makes all of them finish the iteration, save a checkpoint that
resumes exactly there and exit.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from cls.checkpoint import CHECKPOINT_NAME, capture_rng, rank_buffers, save_atomic
from cls.distributed import DistEnv
from mabn.utils.errors import NonFiniteLossError
from cls.metrics import Meter, label_smoothing_loss, topk_correct
from cls.run_log import RunLog, test_line, train_line

__all__ = ["StopFlag", "TrainState", "Trainer", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "mabn-cls-1"


class StopFlag:
    """Set from a signal handler; read once per iteration."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def request(self, name: str = "SIGTERM") -> None:
        self.requested = True
        self.signal_name = name


@dataclass
class TrainState:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # completed iterations of epoch + 1
    global_step: int = 0
    meter: Meter = field(default_factory=Meter)


class Trainer:
    def __init__(self, args: argparse.Namespace, env: DistEnv, model: nn.Module, wrapped: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, scaler, log: RunLog, state: TrainState,
                 train_loader=None, sampler=None, val_loader=None, recorder=None,
                 stop_flag: Optional[StopFlag] = None):
        self.args = args
        self.env = env
        self.model = model
        self.wrapped = wrapped
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.log = log
        self.state = state
        self.train_loader = train_loader
        self.sampler = sampler
        self.val_loader = val_loader
        self.recorder = recorder
        self.stop_flag = stop_flag or StopFlag()
        self.checkpoint_path = os.path.join(args.save, CHECKPOINT_NAME)
        self.saved_any = False

    # ----------------------------------------------------------------------------------------
    def autocast(self):
        if not self.args.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.env.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.env.device.type, dtype=dtype)

    def _progress(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                    disable=not (self.env.is_main and self.args.progress))

    # ----------------------------------------------------------------------------------------
    def train(self) -> bool:
        """Train up to ``--total_epoch``. Returns False when stopped by a signal (after saving)."""
        args, state = self.args, self.state
        self.model.train()
        for epoch in range(state.epoch + 1, args.total_epoch + 1):
            if state.step_in_epoch == 0:
                state.meter = Meter()
            self.sampler.set_epoch(epoch, state.step_in_epoch)
            progress = self._progress(args.iters_per_epoch, state.step_in_epoch, f"epoch {epoch}")
            try:
                for images, targets in self.train_loader:
                    stop = self._train_step(epoch, images, targets)
                    progress.update()
                    if stop:
                        progress.close()
                        self.save_checkpoint()
                        self.log.info(f"{self.stop_flag.signal_name or 'stop'} received: saved {self.checkpoint_path} "
                                      f"at epoch {epoch}, iteration {state.step_in_epoch}/{args.iters_per_epoch}; "
                                      f"resume with --checkpoint_dir {self.checkpoint_path}")
                        return False
            finally:
                progress.close()
            self._end_epoch(epoch)
        return True

    def _train_step(self, epoch: int, images: torch.Tensor, targets: torch.Tensor) -> bool:
        args, env, state = self.args, self.env, self.state
        device = env.device
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if self.recorder is not None:
            self.recorder.set_step(state.global_step)
        with self.autocast():
            logits = self.wrapped(images)
        loss = label_smoothing_loss(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if hasattr(self.wrapped, "average_gradients"):
            self.wrapped.average_gradients()
        if self.recorder is not None:
            self.recorder.flush(self.scaler.get_scale() if self.scaler is not None else 1.0)

        n = float(targets.shape[0])
        hits = topk_correct(logits.detach(), targets)
        local_loss = loss.detach().double()
        flags = torch.stack([
            local_loss * n, hits[0], hits[1], torch.tensor(n, dtype=torch.float64, device=device),
            (~torch.isfinite(local_loss)).double(),
            torch.tensor(float(self.stop_flag.requested), dtype=torch.float64, device=device)])
        loss_sum, top1, top5, count, non_finite, stop = env.all_reduce_sum(flags).tolist()
        if non_finite > 0:
            where = (f"epoch {epoch}, iteration {state.step_in_epoch + 1}/{args.iters_per_epoch} "
                     f"(global step {state.global_step + 1})")
            kept = (f"the last good checkpoint {self.checkpoint_path} was kept"
                    if os.path.exists(self.checkpoint_path) else "no checkpoint was written")
            raise NonFiniteLossError(f"non-finite training loss ({local_loss.item()} on rank {env.rank}; non-finite on "
                                     f"{int(non_finite)} of {env.world_size} processes) at {where}; "
                                     f"training stopped, {kept} (lower --learning_rate?)")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        state.meter.add(loss_sum, top1, top5, count)
        state.step_in_epoch += 1
        state.global_step += 1
        if state.global_step % args.log_interval == 0:
            self.log.scalar("train/loss", loss_sum / count, state.global_step)
            self.log.scalar("train/top1_err", 100.0 * (1 - top1 / count), state.global_step)
            self.log.scalar("train/top5_err", 100.0 * (1 - top5 / count), state.global_step)
            self.log.scalar("train/lr", self.optimizer.param_groups[0]["lr"], state.global_step)
        return stop > 0

    def _end_epoch(self, epoch: int) -> None:
        args, state = self.args, self.state
        lr = self.optimizer.param_groups[0]["lr"]  # the rate used during this epoch
        self.scheduler.step()
        meter = state.meter
        self.log.info(train_line(epoch, lr, meter.loss, meter.top1_err, meter.top5_err))
        self.log.scalar("epoch/train_loss", meter.loss, epoch)
        self.log.scalar("epoch/train_top1_err", meter.top1_err, epoch)
        self.log.scalar("epoch/train_top5_err", meter.top5_err, epoch)
        self.log.scalar("epoch/lr", lr, epoch)
        state.epoch = epoch
        state.step_in_epoch = 0
        state.meter = Meter()
        if epoch % args.save_interval == 0 or epoch == args.total_epoch:
            self.save_checkpoint()
        if args.eval_interval and epoch % args.eval_interval == 0 and epoch != args.total_epoch:
            self.evaluate(step=epoch)

    # ----------------------------------------------------------------------------------------
    def checkpoint(self, rank_states) -> dict:
        state = self.state
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": state.epoch,  # published key: completed epochs
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "iters_per_epoch": self.args.iters_per_epoch,
            "meter": state.meter.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.env.world_size,
            "rank_states": rank_states,
            "args": {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        }

    def save_checkpoint(self) -> None:
        """Gather every rank's buffers and RNG states; rank 0 writes the file atomically."""
        own = {"buffers": rank_buffers(self.model), "rng": capture_rng(self.env.device)}
        rank_states = self.env.all_gather_object(own)
        if self.env.is_main:
            save_atomic(self.checkpoint(rank_states), self.checkpoint_path)
            self.saved_any = True
            self.log.info(f"saved checkpoint {self.checkpoint_path} (epoch {self.state.epoch}"
                          + (f", iteration {self.state.step_in_epoch}" if self.state.step_in_epoch else "") + ")")

    # ----------------------------------------------------------------------------------------
    def _use_rank0_buffers(self):
        """Give every rank rank 0's buffers (those of the checkpoint's ``model``) for evaluation;
        return this rank's own buffers to put back afterwards (None in a single process)."""
        if not self.env.distributed or self.env.world_size == 1:
            return None
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        for buffer in buffers:
            torch.distributed.broadcast(buffer, src=0)
        return saved

    @torch.no_grad()
    def evaluate(self, step: Optional[int] = None) -> Meter:
        """Loss and top-1/top-5 error over the whole validation set (sharded, summed over ranks).

        Every rank evaluates with rank 0's normalization statistics (the ones a checkpoint's
        ``model`` holds), so the result equals a ``--test_only`` run on that checkpoint.
        """
        model, device = self.model, self.env.device
        was_training = model.training
        own_buffers = self._use_rank0_buffers()
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        progress = self._progress(len(self.val_loader), 0, "test")
        try:
            for images, targets in self.val_loader:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with self.autocast():
                    logits = model(images)
                sums[0] += label_smoothing_loss(logits, targets, reduction="sum").double()
                sums[1:3] += topk_correct(logits, targets)
                sums[3] += targets.shape[0]
                progress.update()
        finally:
            progress.close()
        model.train(was_training)
        if own_buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), own_buffers):
                    buffer.copy_(saved)
        loss_sum, top1, top5, count = self.env.all_reduce_sum(sums).tolist()
        meter = Meter()
        meter.add(loss_sum, top1, top5, count)
        self.log.info(test_line(meter.loss, meter.top1_err, meter.top5_err))
        if step is not None:
            self.log.scalar("test/loss", meter.loss, step)
            self.log.scalar("test/top1_err", meter.top1_err, step)
            self.log.scalar("test/top5_err", meter.top5_err, step)
        if not math.isfinite(meter.loss):
            self.log.warning("the validation loss is not finite")
        return meter
