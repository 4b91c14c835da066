"""Train or evaluate a ResNet with small normalization batches (``docs/cls.md``).

Runs as ``python -m torch.distributed.launch --nproc_per_node=8 train.py ...`` (from ``cls/``),
``torchrun ... cls/train.py ...``, ``python cls/train.py ...`` or ``python -m cls.train ...``.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a file (cls/train.py): import the packages from the repository root, and keep this
    # directory off sys.path so that cls/*.py never shadow top-level modules.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _HERE:
        sys.path.pop(0)
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import warnings  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cls.checkpoint import (load_model_state, load_rank_buffers, read_checkpoint,  # noqa: E402
                            resolve_checkpoint_path, restore_rng)
from cls.config import parse_args, resolve  # noqa: E402
from cls.data import (AugmentedImageFolder, TrainBatchSampler, build_train_loader,  # noqa: E402
                      build_val_loader, open_image_folder)
from cls.distributed import DistEnv, GradientAveraging, cleanup, setup  # noqa: E402
from cls.engine import StopFlag, Trainer, TrainState  # noqa: E402
from mabn.utils.errors import NonFiniteLossError, UserError, one_line  # noqa: E402
from cls.metrics import Meter  # noqa: E402
from cls.models import build_model  # noqa: E402
from cls.norms import norm_choice  # noqa: E402
from cls.run_log import RunLog  # noqa: E402
from cls.transforms import TrainTransform, ValTransform  # noqa: E402

__all__ = ["main", "run"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _default_workers(env: DistEnv) -> int:
    return min(8, max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))


def _datasets(args: argparse.Namespace, env: DistEnv):
    """(train folder or None, val folder) as ImageFolders; writes the embedded dataset if needed."""
    if args.dataset == "synthetic":
        from cls.embedded_dataset import ensure_embedded_dataset

        root = ensure_embedded_dataset(args.data_cache, args.data_seed, args.synthetic_classes,
                                       args.synthetic_train_per_class, args.synthetic_val_per_class,
                                       args.synthetic_image_size,
                                       log=(print if env.local_rank == 0 else (lambda *_: None)))
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


def _install_sigterm(flag: StopFlag):
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: flag.request("SIGTERM"))
    except ValueError:  # not the main thread
        return None


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    env = setup(args.device, args.local_rank)
    stop_flag = StopFlag()
    previous_handler = _install_sigterm(stop_flag)
    log: Optional[RunLog] = None
    recorder = None
    try:
        resolve(args, env.world_size)
        if args.workers is None:
            args.workers = _default_workers(env)
        _seed_everything(args.seed)

        # Inputs first: nothing is written to --save before they all check out.
        train_folder, val_folder = _datasets(args, env)
        args.num_classes = _num_classes(args, train_folder, val_folder)
        norm = norm_choice(args.norm, args.per_gpu_batch, args.norm_batch, args.ma_batch, args.warmup_iters,
                           args.gn_groups)
        model = build_model(args.arch, args.num_classes, norm, norm.conv).to(env.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=args.momentum,
                                    dampening=0.0, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(args.lr_milestones), 0.1)
        scaler = torch.amp.GradScaler("cuda") if args.amp and env.device.type == "cuda" else None
        state = TrainState()
        checkpoint = None
        if args.checkpoint_dir is not None:
            path = resolve_checkpoint_path(args.checkpoint_dir)
            checkpoint = read_checkpoint(path)
            load_model_state(model, checkpoint["model"], path)
            if not args.test_only:
                state = _restore_training_state(args, env, checkpoint, optimizer, scheduler, scaler, path)

        log = RunLog(args.save, env.is_main, env.rank, file_log=True, tensorboard=not args.test_only)
        log.info(str(argparse.Namespace(**{k: v for k, v in sorted(vars(args).items())
                                            if k not in ("explicit", "from_config")})))
        if args.config:
            log.info(f"config {args.config}: {', '.join(args.from_config) or 'nothing'} from the file; "
                     f"command line: {', '.join(a for a in args.explicit if a != 'config') or 'nothing'}")
        log.info(f"{env.world_size} process(es) on {env.device.type} ({env.backend or 'no process group'}), "
                 f"{args.per_gpu_batch} images per process, {args.arch} with {norm.describe()}, "
                 f"{args.num_classes} classes")
        print(f"rank {env.rank:d}: load data successfully", flush=True)

        wrapped = model
        if env.distributed and not args.test_only and env.device.type == "cpu" and args.norm == "syncbn":
            # DDP rejects SyncBatchNorm layers in CPU modules; average the gradients explicitly.
            wrapped = GradientAveraging(model, env.world_size)
            _restore_rank_state(env, checkpoint, model, log)
        elif env.distributed and not args.test_only:
            with warnings.catch_warnings():
                # Recent torch deprecates broadcast_buffers in favour of forward_sync_buffers, which
                # still syncs buffers at init; rank-local buffers need broadcast_buffers=False.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                    broadcast_buffers=False)
            _restore_rank_state(env, checkpoint, model, log)
        elif checkpoint is not None and not args.test_only:
            _restore_rank_state(env, checkpoint, model, log)

        val_loader = build_val_loader(AugmentedImageFolder(val_folder, ValTransform(args.image_size)),
                                      args.val_batch_size, env.rank, env.world_size, args.workers, env.device)
        train_loader = sampler = None
        if not args.test_only:
            sampler = TrainBatchSampler(len(train_folder), args.per_gpu_batch, args.iters_per_epoch, env.rank,
                                        env.world_size, args.seed)
            train_loader = build_train_loader(AugmentedImageFolder(train_folder, TrainTransform(args.image_size)),
                                              sampler, args.workers, env.device)
            if args.record_statistics and env.is_main:
                from cls.bn_statistics import StatisticsRecorder, statistics_dir

                group = args.per_gpu_batch if args.norm == "syncbn" else args.norm_batch
                try:
                    recorder = StatisticsRecorder(model, statistics_dir(args.save, args.per_gpu_batch, args.norm_batch),
                                                  group, args.stat_channel, args.stat_interval)
                except ValueError as exc:
                    raise UserError(str(exc)) from None

        trainer = Trainer(args, env, model, wrapped, optimizer, scheduler, scaler, log, state, train_loader, sampler,
                          val_loader, recorder, stop_flag)
        if not args.test_only:
            if state.epoch >= args.total_epoch:
                log.info(f"the checkpoint has already completed {state.epoch} >= --total_epoch {args.total_epoch} epochs")
            elif not trainer.train():
                return 0
        if recorder is not None:  # remove the hooks before evaluation and export
            recorder.close()
            recorder = None
        trainer.evaluate(step=state.epoch if not args.test_only else None)
        if args.export_folded and env.is_main:
            _export(args, model, val_loader, env, log)
        env.barrier()
        return 0
    finally:
        if recorder is not None:
            recorder.close()
        if log is not None:
            log.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        cleanup(env)


def _restore_training_state(args, env: DistEnv, checkpoint: dict, optimizer, scheduler, scaler, path: str) -> TrainState:
    """Optimizer, scheduler, position and meters from ``checkpoint`` (published keys suffice)."""
    state = TrainState()
    try:
        if "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        if "scheduler" in checkpoint:
            scheduler.load_state_dict(checkpoint["scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path}: the optimizer/scheduler state does not fit ({exc})") from None
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    state.epoch = int(checkpoint.get("epoch", checkpoint.get("iteration", 0)))
    state.step_in_epoch = int(checkpoint.get("step_in_epoch", 0))
    if state.step_in_epoch and checkpoint.get("iters_per_epoch") != args.iters_per_epoch:
        raise UserError(f"checkpoint {path} stopped inside an epoch of {checkpoint.get('iters_per_epoch')} iterations; "
                        f"resume it with --iters_per_epoch {checkpoint.get('iters_per_epoch')}")
    state.global_step = int(checkpoint.get("global_step", state.epoch * args.iters_per_epoch + state.step_in_epoch))
    state.meter = Meter()
    state.meter.load_state_dict(checkpoint.get("meter", {}))
    return state


def _restore_rank_state(env: DistEnv, checkpoint: Optional[dict], model: torch.nn.Module, log: RunLog) -> None:
    """This rank's buffers and RNG states (after DDP construction, which may broadcast rank 0's)."""
    if checkpoint is None:
        return
    rank_states = checkpoint.get("rank_states")
    if rank_states and len(rank_states) == env.world_size:
        own = rank_states[env.rank]
        load_rank_buffers(model, own["buffers"])
        restore_rng(own["rng"], env.device)
    elif rank_states:
        log.warning(f"the checkpoint holds the buffers of {len(rank_states)} processes, this run has "
                    f"{env.world_size}: every process starts from rank 0's buffers")


def _export(args, model, val_loader, env: DistEnv, log: RunLog) -> None:
    from cls.export import export_folded

    sample = next(iter(val_loader))[0][:8].to(env.device)
    _, difference = export_folded(model, args.export_folded, sample)
    log.info(f"exported the folded model to {args.export_folded} (max |output difference| {difference:.3g})")


def _report(error: BaseException) -> None:
    """``error: <one line>`` on stderr (``error (rank N): ...`` on the other ranks of a launch)."""
    rank = os.environ.get("RANK", "0")
    prefix = "error" if rank in ("", "0") else f"error (rank {rank})"
    print(f"{prefix}: {one_line(error)}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success (or a clean stop on SIGTERM), 2 on bad input, 3 on a NaN/Inf loss."""
    try:
        return run(argv)
    except NonFiniteLossError as exc:
        _report(exc)
        return 3
    except UserError as exc:
        _report(exc)
        return 2
    except RuntimeError as exc:  # a DataLoader worker's CorruptImageError may arrive re-wrapped
        if "CorruptImageError" in str(exc):
            _report(exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
