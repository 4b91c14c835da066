"""Train or evaluate a ResNet with small normalization batches (``docs/cls.md``).

Runs as ``python -m torch.distributed.launch --nproc_per_node=8 train.py ...`` (from ``cls/``),
``torchrun ... cls/train.py ...``, ``python cls/train.py ...`` or ``python -m cls.train ...``
(the package is installed, so the working directory does not matter).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from cls.checkpoint import CHECKPOINT_NAME, CheckpointWriter, flags_of, read_training_checkpoint
from cls.config import parse_args, resolve
from cls.data import (AugmentedImageFolder, TrainBatchSampler, build_train_loader, build_val_loader,
                      open_image_folder)
from cls.engine import EpochLogHook, Evaluator, MetricsWriter, Trainer, TrainState
from cls.models import build_model
from cls.norms import norm_choice_from_args
from cls.resume import apply_optimizer_flags, compare_flags, restore_training_state
from cls.run_log import LOG_PREFIX, LOGGER_NAME
from cls.transforms import TrainTransform, ValTransform
from mabn.utils.amp import Precision
from mabn.utils.checkpoint import (kept_message, load_model_state, resolve_checkpoint_path, restore_rank_state,
                                   seed_all)
from mabn.utils.distributed import (DistEnv, check_on_main_rank, destroy_distributed, init_distributed,
                                    wrap_data_parallel)
from mabn.utils.errors import NonFiniteLossError, UserError, run_cli
from mabn.utils.lock import FolderLock
from mabn.utils.lr_schedule import WarmupMultiStep, build_scheduler
from mabn.utils.run_log import RunLog
from mabn.utils.signals import stop_on_signals
from mabn.utils.train_loop import CheckpointHook, EvalHook, HookBase, LRSchedulerHook, StatisticsHook

__all__ = ["main", "run"]


@dataclass
class Learner:
    """The network and what updates it."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision


def _check_output_folder(args: argparse.Namespace) -> None:
    """Never overwrite a run's checkpoint by accident: training into a --save that holds one
    needs --checkpoint_dir on it (resume) or --overwrite (start over)."""
    existing = os.path.join(args.save, CHECKPOINT_NAME)
    if args.test_only or args.overwrite or not os.path.isfile(existing):
        return
    resumed = None if args.checkpoint_dir is None else resolve_checkpoint_path(args.checkpoint_dir, "--checkpoint_dir")
    if resumed is not None and os.path.samefile(resumed, existing):
        return
    raise UserError(f"--save {args.save} already holds a checkpoint ({existing}); resume it with --checkpoint_dir "
                    f"{args.save}, or pass --overwrite to start over")


def _check_flags(args: argparse.Namespace, env: DistEnv) -> None:
    resolve(args, env.world_size)
    if args.workers is None:
        args.workers = min(8, max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))
    check_on_main_rank(env, lambda: _check_output_folder(args))


def _datasets(args: argparse.Namespace, env: DistEnv):
    """(train folder or None, val folder) as ImageFolders; writes the embedded dataset if needed."""
    if args.dataset == "synthetic":
        from cls.embedded_dataset import ensure_embedded_dataset

        root = ensure_embedded_dataset(args.data_cache, args.data_seed, args.synthetic_classes,
                                       args.synthetic_train_per_class, args.synthetic_val_per_class,
                                       args.synthetic_image_size,
                                       log=(print if env.local_rank == 0 else (lambda *_: None)),
                                       difficulty=args.synthetic_difficulty)
        train_dir, val_dir = str(root / "train"), str(root / "val")
        args.train_dir_used, args.val_dir_used = train_dir, val_dir
        train = None if args.test_only else open_image_folder(train_dir, "embedded train set")
        return train, open_image_folder(val_dir, "embedded val set")
    args.train_dir_used, args.val_dir_used = args.train_dir, args.val_dir
    train = None if args.test_only else open_image_folder(args.train_dir, "--train_dir")
    return train, open_image_folder(args.val_dir, "--val_dir")


def _num_classes(args: argparse.Namespace, train, val) -> int:
    classes = train.classes if train is not None else val.classes
    if train is not None and train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise UserError(f"--train_dir and --val_dir have different class folders ({len(train.classes)} vs "
                        f"{len(val.classes)}; only in train: {only_train}, only in val: {only_val})")
    if args.num_classes is None:
        return len(classes)
    if args.num_classes < len(classes):
        raise UserError(f"--num_classes {args.num_classes} is smaller than the {len(classes)} classes of the dataset")
    return args.num_classes


def _build_learner(args: argparse.Namespace, env: DistEnv):
    norm = norm_choice_from_args(args)
    network = build_model(args.arch, args.num_classes, norm, norm.conv).to(env.device)
    optimizer = torch.optim.SGD(network.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                dampening=0.0, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, WarmupMultiStep(tuple(sorted(args.lr_milestones)), 0.1))
    precision = Precision(args.amp, env.device)
    precision.track(network)
    return Learner(network, optimizer, scheduler, precision), norm


def _resume(args: argparse.Namespace, env: DistEnv,
            learner: Learner) -> Tuple[Optional[str], Optional[dict], TrainState, list]:
    """(checkpoint path, checkpoint, training state, log lines about changed flags)."""
    if args.checkpoint_dir is None:
        return None, None, TrainState(), []
    path, checkpoint = read_training_checkpoint(args.checkpoint_dir, args.trust_checkpoint)
    flags = flags_of(args)
    changes = compare_flags(checkpoint, path, flags, env.world_size, args.test_only)
    load_model_state(learner.network, checkpoint["model"], path, hint="another --arch, --norm or --num_classes?")
    if args.test_only:
        return path, checkpoint, TrainState(), changes.lines
    state = restore_training_state(checkpoint, path, learner.optimizer, learner.precision, args.iters_per_epoch)
    apply_optimizer_flags(learner.optimizer, learner.scheduler, flags, changes.applied, state.epoch)
    return path, checkpoint, state, changes.lines


def _lock_output_folder(stack: contextlib.ExitStack, args: argparse.Namespace, env: DistEnv) -> None:
    """Lock --save for this run (and check it again: another run may have written there meanwhile)."""
    lock = FolderLock(args.save, "--save")
    stack.callback(lock.release)

    def lock_and_check() -> None:
        lock.acquire()
        _check_output_folder(args)

    check_on_main_rank(env, lock_and_check)


def _log_header(log: RunLog, args: argparse.Namespace, env: DistEnv, norm, resume_lines) -> None:
    log.info(str(argparse.Namespace(**flags_of(args))))
    if args.config:
        log.info(f"config {args.config}: {', '.join(args.from_config) or 'nothing'} from the file; "
                 f"command line: {', '.join(a for a in args.explicit if a != 'config') or 'nothing'}")
    for line in resume_lines:
        log.info(line)
    log.info(f"{env.world_size} process(es) on {env.device.type} ({env.backend or 'no process group'}), "
             f"{args.per_gpu_batch} images per process, {args.arch} with {norm.describe()}, "
             f"{args.num_classes} classes")
    print(f"rank {env.rank:d}: load data successfully", flush=True)


def _statistics_hook(args: argparse.Namespace, env: DistEnv, network: nn.Module, trainer: Trainer,
                     stack: contextlib.ExitStack) -> Optional[HookBase]:
    if not (args.record_statistics and env.is_main):
        return None
    from cls.bn_statistics import StatisticsRecorder, statistics_dir

    group = args.per_gpu_batch if args.norm == "syncbn" else args.norm_batch
    try:
        recorder = StatisticsRecorder(network, statistics_dir(args.save, args.per_gpu_batch, args.norm_batch),
                                      group, args.stat_channel, args.stat_interval)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stack.callback(recorder.close)
    return StatisticsHook(recorder, lambda: trainer.step_grad_scale)


def _epoch_end(trainer: Trainer) -> bool:
    return trainer.epoch_finished


@dataclass(frozen=True)
class _StartPoint:
    """Where training starts: the resumed checkpoint (its path and contents; None, None for a
    fresh run) and the training state restored from it."""

    path: Optional[str]
    checkpoint: Optional[dict]
    state: TrainState


def _train(args: argparse.Namespace, env: DistEnv, learner: Learner, start: _StartPoint, train_folder,
           evaluator: Evaluator, log: RunLog, stack: contextlib.ExitStack) -> bool:
    """Train to --total_epoch; False when stopped by a signal (after saving)."""
    network, state = learner.network, start.state
    wrapped = wrap_data_parallel(network, env)
    restore_rank_state(start.checkpoint, start.path, network, env)
    sampler = TrainBatchSampler(len(train_folder), args.per_gpu_batch, args.iters_per_epoch, env.rank,
                                env.world_size, args.seed)
    loader = build_train_loader(AugmentedImageFolder(train_folder, TrainTransform(args.image_size)), sampler,
                                args.workers, env.device)
    trainer = Trainer(wrapped, learner.optimizer, loader, env, args.iters_per_epoch, state, learner.precision)
    save = CheckpointWriter(args.save, network, trainer, learner.scheduler, flags_of(args), log)
    trainer.register_hooks([
        _statistics_hook(args, env, network, trainer, stack),
        EpochLogHook(log, network, args.log_interval),  # before the scheduler: it logs the epoch's rate
        LRSchedulerHook(learner.scheduler, _epoch_end),
        CheckpointHook(save, lambda t: t.epoch_finished and (state.epoch % args.save_interval == 0
                                                             or state.epoch == args.total_epoch)),
        EvalHook(lambda: evaluator(step=state.epoch),
                 lambda t: t.epoch_finished and args.eval_interval > 0 and state.epoch % args.eval_interval == 0),
    ])
    if state.epoch >= args.total_epoch:
        log.info(f"the checkpoint has already completed {state.epoch} >= --total_epoch {args.total_epoch} epochs")
        return True
    try:
        with stop_on_signals(trainer.stop_flag):
            finished = trainer.train_epochs(args.total_epoch)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(f"{exc}; training stopped, {kept_message(save.path)} "
                                 f"(lower --learning_rate?)") from None
    if not finished:
        where = (f"at epoch {state.epoch + 1}, iteration {state.step_in_epoch}/{args.iters_per_epoch}"
                 if state.step_in_epoch else f"at the end of epoch {state.epoch}")
        log.info(f"{trainer.stop_flag.signal_name} received: saved {save.path} {where}; "
                 f"resume with --checkpoint_dir {save.path}")
    return finished


def _export(args: argparse.Namespace, network: nn.Module, val_loader, env: DistEnv, log: RunLog) -> None:
    from cls.export import export_folded

    sample = next(iter(val_loader))[0][:8].to(env.device)
    try:
        _, difference = export_folded(network, args.export_folded, sample)
    except OSError as exc:
        raise UserError(f"--export_folded {args.export_folded}: cannot write ({exc.strerror or exc}); the "
                        f"checkpoint in --save is complete: rerun with --test_only --checkpoint_dir {args.save} "
                        f"to export") from None
    log.info(f"exported the folded model to {args.export_folded} (max |output difference| {difference:.3g})")


def _run(args: argparse.Namespace, env: DistEnv, stack: contextlib.ExitStack) -> int:
    # Inputs first: nothing is written to --save before they all check out.
    _check_flags(args, env)
    seed_all(args.seed)
    train_folder, val_folder = _datasets(args, env)
    args.num_classes = _num_classes(args, train_folder, val_folder)
    learner, norm = _build_learner(args, env)
    checkpoint_path, checkpoint, state, resume_lines = _resume(args, env, learner)

    _lock_output_folder(stack, args, env)
    log = stack.enter_context(RunLog(args.save, env.is_main, env.rank, logger_name=LOGGER_NAME, file_prefix=LOG_PREFIX,
                                     tensorboard_dir=None if args.test_only else "tb", progress=args.progress))
    _log_header(log, args, env, norm, resume_lines)
    val_loader = build_val_loader(AugmentedImageFolder(val_folder, ValTransform(args.image_size)),
                                  args.val_batch_size, env.rank, env.world_size, args.workers, env.device)
    metrics = None if args.test_only else MetricsWriter(args.save, state.epoch, env.is_main)
    evaluator = Evaluator(learner.network, val_loader, env, learner.precision, log, metrics)
    if not args.test_only and not _train(args, env, learner, _StartPoint(checkpoint_path, checkpoint, state),
                                         train_folder, evaluator, log, stack):
        return 0
    result = evaluator(step=None if args.test_only else state.epoch)
    if not math.isfinite(result.loss):
        raise NonFiniteLossError(f"non-finite validation loss ({result.loss}); the model is not usable")
    if args.export_folded and env.is_main:
        _export(args, learner.network, val_loader, env, log)
    env.barrier()
    return 0


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, then train and/or evaluate; 0 on success or a clean stop on a signal."""
    args = parse_args(argv)
    env = init_distributed(args.device, args.local_rank, device_option="--device")
    with contextlib.ExitStack() as stack:
        stack.callback(destroy_distributed, env)
        return _run(args, env, stack)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success (or a clean stop on SIGTERM/SIGINT), 2 on bad input, 3 on NaN/Inf."""
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
