"""What ``tools/train_net.py`` and ``tools/test_net.py`` run, with the published arguments.

Both take ``--config-file FILE``, ``--local_rank N`` / ``--local-rank N`` (``LOCAL_RANK`` wins)
and trailing ``KEY VALUE`` config options, and run in one process or under
``python -m torch.distributed.launch`` / ``torchrun`` (NCCL on CUDA, gloo on the CPU;
``MODEL.DEVICE cpu``, ``cuda`` or ``auto``). ``train_net`` also takes ``--skip-test``;
``test_net`` takes ``--ckpt FILE``, and without it ``OUTPUT_DIR/last_checkpoint`` wins over
``MODEL.WEIGHT``, as published.

Bad input fails before any work, with one ``error: ...`` line and exit status 2: an unknown key,
a device that is not there, batch sizes that do not divide by the number of processes, a remote
or missing weight file, missing data, an ``OUTPUT_DIR`` that is a file or is used by another run,
a resume whose config changes the model, malformed ``TEST.EXPECTED_RESULTS``. A NaN/Inf loss
stops training with exit status 3 and keeps the last good checkpoint; SIGTERM/SIGINT save a
checkpoint and exit with 0 (rerun the same command to resume). Final metrics outside
``TEST.EXPECTED_RESULTS`` end the run with exit status 4 and one error line, after everything is
written (:mod:`det.evaluation.expected`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from det.config import load_config
from det.data import batch_size_per_process, build_test_loaders, build_train_loader
from det.data.build import TestLoaderOptions, TrainLoaderOptions
from det.data.coco import COCODataset
from det.engine.checkpoint import (CheckpointWriter, compare_configs, find_last_checkpoint, read_checkpoint,
                                   restore_rank_state, restore_training_state)
from det.engine.inference import inference
from det.engine.trainer import DetectionTrainer, MetricsWriter, PeriodicCheckpoint, build_hooks, precision_from_dtype
from det.evaluation import (EXIT_EXPECTED_RESULTS, ExpectedResult, ExpectedResultsError, check_expected_results,
                            parse_expected_results)
from det.modeling import build_detection_model, load_weights
from det.modeling.weights import resolve_weight_path
from det.solver import make_lr_scheduler, make_optimizer
from mabn.utils.amp import Precision
from mabn.utils.checkpoint import seed_all, write_text_atomic
from mabn.utils.distributed import (DistEnv, check_on_main_rank, destroy_distributed, init_distributed,
                                    resolve_device, wrap_data_parallel)
from mabn.utils.errors import NonFiniteLossError, UserError, report, run_cli
from mabn.utils.lock import FolderLock
from mabn.utils.run_log import RunLog
from mabn.utils.signals import stop_on_signals

__all__ = ["LOGGER_NAME", "parse_args", "test_net", "test_net_main", "train_net", "train_net_main"]

LOGGER_NAME = "det"
LOG_FILE = "log.txt"
CONFIG_DUMP = "config.yml"

_TestLoaders = List[Tuple[str, COCODataset, DataLoader]]
"""``(name, dataset, loader)`` per DATASETS.TEST entry, as :func:`build_test_loaders` returns them."""


def parse_args(argv: Optional[Sequence[str]], test: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="PyTorch Object Detection " + ("Inference" if test else "Training"),
        epilog="KEY VALUE pairs after the flags override the config (e.g. SOLVER.IMS_PER_BATCH 16 OUTPUT_DIR out).")
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by torch.distributed.launch (LOCAL_RANK wins)")
    if test:
        parser.add_argument("--ckpt", default=None, metavar="FILE",
                            help="the checkpoint to evaluate (default: OUTPUT_DIR/last_checkpoint, else MODEL.WEIGHT)")
    else:
        parser.add_argument("--skip-test", dest="skip_test", action="store_true",
                            help="do not evaluate the final model")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE config options")
    args = parser.parse_args(argv)
    # Flags written after the KEY VALUE pairs land in the remainder: parse them as flags.
    flags = [token for token in args.opts or [] if token.startswith("--")]
    if flags:
        first = args.opts.index(flags[0])
        args.opts, rest = args.opts[:first], args.opts[first:]
        late = parser.parse_args(rest)
        if late.opts:
            parser.error(f"KEY VALUE options go before or after all flags, not between them: {' '.join(late.opts)}")
        for name, value in vars(late).items():
            if name != "opts" and value != parser.get_default(name):
                setattr(args, name, value)
    return args


def _device_choice(name: str) -> str:
    """``MODEL.DEVICE`` as :func:`init_distributed` takes it ("cpu", "cuda" or "auto"), with a
    one-line error for a device this trainer does not run on or CUDA that is absent."""
    if name == "auto":
        return name
    device_type = resolve_device(name, "MODEL.DEVICE").type
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"MODEL.DEVICE {name!r}: use cpu, cuda or auto")
    return device_type


def _check_output_dir(output_dir: str) -> None:
    if not output_dir:
        raise UserError("OUTPUT_DIR is empty; pass OUTPUT_DIR <folder>")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"OUTPUT_DIR {output_dir} is a file, not a folder; pass another OUTPUT_DIR")


def _check_weight_file(path: str, what: str) -> None:
    """A local file or a ``catalog://`` name whose file is in the weights folder (one-line
    error otherwise, before any work; nothing is downloaded)."""
    resolve_weight_path(path, what)


def _check_test_data(cfg: CfgNode, world_size: int) -> None:
    if not cfg.DATASETS.TEST:
        raise UserError("DATASETS.TEST is empty; name a test dataset (or pass --skip-test and SOLVER.TEST_PERIOD 0)")
    batch_size_per_process(cfg.TEST.IMS_PER_BATCH, world_size, "TEST.IMS_PER_BATCH")


def _check_solver_counts(cfg: CfgNode) -> None:
    solver = cfg.SOLVER
    for key, minimum in (("MAX_ITER", 1), ("CHECKPOINT_PERIOD", 1), ("TEST_PERIOD", 0)):
        if getattr(solver, key) < minimum:
            raise UserError(f"SOLVER.{key} {getattr(solver, key)} must be >= {minimum}")


def _lock_existing_folder(stack: contextlib.ExitStack, env: DistEnv, folder: str) -> Callable[[], None]:
    """Lock ``folder`` now if it exists, so that a folder in use fails before any work; return the
    call that locks it otherwise, once the inputs have checked out and the folder may be created."""
    lock = FolderLock(folder, "OUTPUT_DIR")
    stack.callback(lock.release)
    if os.path.isdir(folder):
        check_on_main_rank(env, lock.acquire)
        return lambda: None
    return lambda: check_on_main_rank(env, lock.acquire)


def _log_start(log: RunLog, env: DistEnv, args: argparse.Namespace, detail: str = "") -> None:
    log.info(f"Using {env.world_size} process(es) on {env.device.type} ({env.backend or 'no process group'}){detail}")
    log.info(f"Loaded configuration file {args.config_file or '(none)'}; options: {' '.join(args.opts) or '(none)'}")


def _open_log(stack: contextlib.ExitStack, output_dir: str, env: DistEnv, tensorboard: bool) -> RunLog:
    """Console, ``OUTPUT_DIR/log.txt`` (appended) and TensorBoard on rank 0."""
    return stack.enter_context(RunLog(output_dir, env.is_main, env.rank, logger_name=LOGGER_NAME, file_prefix=None,
                                      file_name=LOG_FILE, tensorboard_dir="tensorboard" if tensorboard else None))


def _write_config(cfg: CfgNode, output_dir: str, env: DistEnv, log: RunLog) -> None:
    if not env.is_main:
        return
    path = os.path.join(output_dir, CONFIG_DUMP)
    write_text_atomic(path, cfg.dump())
    log.info(f"Saving config into: {path}")


def _iou_types(cfg: CfgNode) -> tuple:
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def _expected_results(cfg: CfgNode) -> List[ExpectedResult]:
    return parse_expected_results(cfg.TEST.EXPECTED_RESULTS, _iou_types(cfg), cfg.TEST.EXPECTED_RESULTS_SIGMA_TOL)


def _check_expected(cfg: CfgNode, expected: List[ExpectedResult], metrics, log: RunLog) -> None:
    """Log maskrcnn-benchmark's PASS/FAIL lines for the final metrics; raise if any entry fails."""
    if not expected:
        return
    lines, failures = check_expected_results(metrics, expected, cfg.TEST.EXPECTED_RESULTS_SIGMA_TOL)
    for line in lines:
        (log.info if line.startswith("PASS") else log.warning)(line)
    if failures:
        tolerance = cfg.TEST.EXPECTED_RESULTS_SIGMA_TOL
        raise ExpectedResultsError(f"TEST.EXPECTED_RESULTS not met (sigma_tol {tolerance:g}): " + "; ".join(failures))


def _quiet(_message: str) -> None:
    pass


def _data_log(env: DistEnv) -> Callable[[str], None]:
    """Where the data code reports: ``print`` on each machine's first process, nowhere elsewhere."""
    return print if env.local_rank == 0 else _quiet


def _test_loaders(cfg: CfgNode, env: DistEnv) -> _TestLoaders:
    options = TestLoaderOptions(cfg.DATASETS.TEST, cfg.DATASETS.ROOT, cfg.TEST.IMS_PER_BATCH, env.world_size, env.rank,
                                cfg.DATALOADER.NUM_WORKERS, pin_memory=env.device.type == "cuda")
    return build_test_loaders(options, log=_data_log(env))


@dataclass
class _TrainInputs:
    """What the input checks of a training run found: the precision of ``DTYPE``, whether the run
    evaluates (periodically or at the end), ``TEST.EXPECTED_RESULTS``, the checkpoint to resume
    from, and the call that locks ``OUTPUT_DIR`` once it may be created."""

    precision: Precision
    evaluates: bool
    expected: List[ExpectedResult]
    resume_path: Optional[str]
    lock_new_folder: Callable[[], None]


@dataclass
class _TrainRun:
    """The model and solver of a training run, and where it starts: the checkpoint it resumes
    (None: none), its first iteration and the lines the log opens with."""

    cfg: CfgNode
    env: DistEnv
    precision: Precision
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    resume_path: Optional[str]
    checkpoint: Optional[Dict[str, Any]] = None
    start_iter: int = 0
    header: List[str] = field(default_factory=list)


@dataclass
class _TrainOutputs:
    """Where a training run reports: the log, ``metrics.json`` and the checkpoints."""

    log: RunLog
    metrics: MetricsWriter
    checkpoints: CheckpointWriter


def _check_train_inputs(args: argparse.Namespace, env: DistEnv, cfg: CfgNode,
                        stack: contextlib.ExitStack) -> _TrainInputs:
    """Check every input of a training run before anything is written, so that bad input fails
    with one error line and no half-made ``OUTPUT_DIR``; lock ``OUTPUT_DIR`` if it exists."""
    output_dir = cfg.OUTPUT_DIR
    _check_output_dir(output_dir)
    _check_solver_counts(cfg)
    precision = precision_from_dtype(cfg.DTYPE, env.device)
    batch_size_per_process(cfg.SOLVER.IMS_PER_BATCH, env.world_size, "SOLVER.IMS_PER_BATCH")
    evaluates = not args.skip_test or cfg.SOLVER.TEST_PERIOD > 0
    expected = _expected_results(cfg)
    if expected and args.skip_test:
        raise UserError("TEST.EXPECTED_RESULTS is checked after the final evaluation, which --skip-test skips; "
                        "drop --skip-test or the expected results")
    if evaluates:
        _check_test_data(cfg, env.world_size)
    resume_path = find_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if resume_path is None and cfg.MODEL.WEIGHT:
        _check_weight_file(cfg.MODEL.WEIGHT, "MODEL.WEIGHT")
    lock_new_folder = _lock_existing_folder(stack, env, output_dir)
    return _TrainInputs(precision, evaluates, expected, resume_path, lock_new_folder)


def _build_training(cfg: CfgNode, env: DistEnv, inputs: _TrainInputs) -> _TrainRun:
    """Seed, then build the model on the device, its optimizer and LR schedule; seeding first makes
    ``SEED`` fix the initial weights."""
    seed_all(cfg.SEED)
    network = build_detection_model(cfg).to(env.device)
    optimizer = make_optimizer(cfg, network)
    scheduler = make_lr_scheduler(cfg, optimizer)
    return _TrainRun(cfg, env, inputs.precision, network, optimizer, scheduler, inputs.resume_path)


def _resume_or_load(run: _TrainRun) -> None:
    """Restore the last checkpoint of ``OUTPUT_DIR`` if there is one (MODEL.WEIGHT is then not
    loaded), else load MODEL.WEIGHT if set; note what was done in ``run.header``."""
    cfg, env, resume_path = run.cfg, run.env, run.resume_path
    if resume_path is not None:
        run.checkpoint = read_checkpoint(resume_path)
        if "config" in run.checkpoint:
            run.header += compare_configs(run.checkpoint["config"], cfg, resume_path,
                                          run.checkpoint.get("world_size"), env.world_size)
        else:
            run.header.append(f"checkpoint {resume_path} stores no config: it cannot be compared with this run's")
        run.start_iter = restore_training_state(run.checkpoint, resume_path, cfg, run.network, run.optimizer,
                                                run.scheduler, run.precision.scaler)
        run.header.append(f"Resuming from {resume_path} at iteration {run.start_iter} (MODEL.WEIGHT is not loaded)")
    elif cfg.MODEL.WEIGHT:
        run.header.append(load_weights(run.network, cfg.MODEL.WEIGHT).summary())
    else:
        run.header.append("MODEL.WEIGHT is empty: training from scratch")


def _train_loader(run: _TrainRun) -> DataLoader:
    """This process's batches from ``run.start_iter`` to SOLVER.MAX_ITER."""
    cfg, env = run.cfg, run.env
    options = TrainLoaderOptions(cfg.DATASETS.TRAIN, cfg.DATASETS.ROOT, cfg.INPUT.HORIZONTAL_FLIP_PROB_TRAIN,
                                 cfg.SOLVER.IMS_PER_BATCH, env.world_size, env.rank, cfg.DATALOADER.NUM_WORKERS,
                                 cfg.DATALOADER.ASPECT_RATIO_GROUPING, cfg.SOLVER.MAX_ITER, run.start_iter,
                                 seed=cfg.SEED, pin_memory=env.device.type == "cuda")
    return build_train_loader(options, log=_data_log(env))


def _open_train_outputs(args: argparse.Namespace, run: _TrainRun, stack: contextlib.ExitStack) -> _TrainOutputs:
    """Open the log (with TensorBoard), write the config and the header lines, and set up the
    metrics and checkpoint writers; the last checkpoint so far is the one resumed."""
    cfg, env, output_dir = run.cfg, run.env, run.cfg.OUTPUT_DIR
    log = _open_log(stack, output_dir, env, tensorboard=True)
    _log_start(log, env, args, f", {cfg.SOLVER.IMS_PER_BATCH // env.world_size} images per process")
    _write_config(cfg, output_dir, env, log)
    for line in run.header:
        log.info(line)
    metrics = MetricsWriter(output_dir, log, run.start_iter, env.is_main)
    checkpoints = CheckpointWriter(output_dir, run.network, run.optimizer, run.scheduler, run.precision.scaler, env,
                                   cfg.dump(), log)
    checkpoints.last_path = run.resume_path
    return _TrainOutputs(log, metrics, checkpoints)


def _make_trainer(run: _TrainRun, train_loader: DataLoader, test_loaders: _TestLoaders,
                  outputs: _TrainOutputs) -> DetectionTrainer:
    """The trainer on the data-parallel model (each rank's own state restored), with the LR,
    logging, periodic checkpoint and (if there are test loaders) periodic evaluation hooks."""
    cfg, env, network = run.cfg, run.env, run.network
    wrapped = wrap_data_parallel(network, env)
    restore_rank_state(run.checkpoint, run.resume_path or "", network, env)
    network.train()
    run.precision.track(network)
    trainer = DetectionTrainer(wrapped, run.optimizer, train_loader, env, run.precision)
    saver = PeriodicCheckpoint(outputs.checkpoints, trainer, cfg.SOLVER.CHECKPOINT_PERIOD)

    def evaluate() -> None:
        outputs.metrics(trainer.iter, inference(network, test_loaders, env, cfg.OUTPUT_DIR, run.precision,
                                                outputs.log, _iou_types(cfg)))

    trainer.register_hooks(build_hooks(trainer, run.scheduler, outputs.log, saver, evaluate if test_loaders else None,
                                       cfg.SOLVER.TEST_PERIOD))
    return trainer


def _run_training(run: _TrainRun, train_loader: DataLoader, test_loaders: _TestLoaders,
                  outputs: _TrainOutputs) -> Optional[int]:
    """Train up to SOLVER.MAX_ITER; the last iteration, or None when SIGTERM/SIGINT stopped the run
    (a checkpoint is saved to resume from). A NaN/Inf loss ends it with the checkpoint kept."""
    max_iter, log = run.cfg.SOLVER.MAX_ITER, outputs.log
    trainer = _make_trainer(run, train_loader, test_loaders, outputs)
    log.info("Start training")
    start = time.perf_counter()
    try:
        with stop_on_signals(trainer.stop_flag):
            finished = trainer.train(run.start_iter, max_iter)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(f"{exc}; training stopped, {outputs.checkpoints.kept()} (lower SOLVER.BASE_LR?)"
                                 ) from None
    seconds = time.perf_counter() - start
    if not finished:
        log.info(f"{trainer.stop_flag.signal_name} received: saved {outputs.checkpoints.last_path} at iteration "
                 f"{trainer.iter}; rerun the same command to resume")
        return None
    log.info(f"Total training time: {timedelta(seconds=int(seconds))} "
             f"({seconds / max(max_iter - run.start_iter, 1):.4f} s / it)")
    return trainer.iter


def _final_eval(args: argparse.Namespace, run: _TrainRun, test_loaders: _TestLoaders, outputs: _TrainOutputs,
                iteration: int, expected: List[ExpectedResult]) -> None:
    """Evaluate the final model unless ``--skip-test``, then, once every process is done,
    check TEST.EXPECTED_RESULTS, so that a miss ends the run after everything is written."""
    final_metrics = None
    if not args.skip_test:
        final_metrics = inference(run.network, test_loaders, run.env, run.cfg.OUTPUT_DIR, run.precision, outputs.log,
                                  _iou_types(run.cfg))
        outputs.metrics(iteration, final_metrics)
    run.env.barrier()
    if final_metrics is not None:
        _check_expected(run.cfg, expected, final_metrics, outputs.log)


def _train(args: argparse.Namespace, env: DistEnv, cfg: CfgNode, stack: contextlib.ExitStack) -> int:
    """``train_net``: check the inputs, build, resume or load weights, train, evaluate the final
    model. ``OUTPUT_DIR`` is created and written only after every input and loader checks out."""
    inputs = _check_train_inputs(args, env, cfg, stack)
    run = _build_training(cfg, env, inputs)
    _resume_or_load(run)
    train_loader = _train_loader(run) if run.start_iter < cfg.SOLVER.MAX_ITER else None
    test_loaders = _test_loaders(cfg, env) if inputs.evaluates else []
    inputs.lock_new_folder()
    outputs = _open_train_outputs(args, run, stack)
    if train_loader is None:
        outputs.log.info(f"the checkpoint has already completed {run.start_iter} >= SOLVER.MAX_ITER "
                         f"{cfg.SOLVER.MAX_ITER} iterations")
        iteration = run.start_iter
    else:
        iteration = _run_training(run, train_loader, test_loaders, outputs)
        if iteration is None:
            return 0
    _final_eval(args, run, test_loaders, outputs, iteration, inputs.expected)
    return 0


def _test(args: argparse.Namespace, env: DistEnv, cfg: CfgNode, stack: contextlib.ExitStack) -> int:
    output_dir = cfg.OUTPUT_DIR
    _check_output_dir(output_dir)
    precision = precision_from_dtype(cfg.DTYPE, env.device)
    _check_test_data(cfg, env.world_size)
    expected = _expected_results(cfg)
    last = find_last_checkpoint(output_dir) if os.path.isdir(output_dir) and not args.ckpt else None
    weight, what = ((args.ckpt, "--ckpt") if args.ckpt else (last, "OUTPUT_DIR/last_checkpoint") if last
                    else (cfg.MODEL.WEIGHT, "MODEL.WEIGHT"))
    if not weight:
        raise UserError("no weights to evaluate: pass --ckpt FILE or MODEL.WEIGHT FILE, or an OUTPUT_DIR whose "
                        "last_checkpoint names one")
    _check_weight_file(weight, what)
    lock_new_folder = _lock_existing_folder(stack, env, os.path.join(output_dir, "inference"))

    seed_all(cfg.SEED)
    network = build_detection_model(cfg).to(env.device)
    report = load_weights(network, weight)
    loaders = _test_loaders(cfg, env)
    lock_new_folder()
    log = _open_log(stack, output_dir, env, tensorboard=False)
    _log_start(log, env, args)
    log.info(report.summary())
    if report.missing:
        log.warning(f"{len(report.missing)} tensors of the model were not in {weight}: they keep their initialization")
    metrics = inference(network, loaders, env, output_dir, precision, log, _iou_types(cfg))
    env.barrier()
    _check_expected(cfg, expected, metrics, log)
    return 0


def _run(argv: Optional[Sequence[str]], test: bool) -> int:
    args = parse_args(argv, test)
    cfg = load_config(args.config_file or None, args.opts or [])
    env = init_distributed(_device_choice(cfg.MODEL.DEVICE), args.local_rank, device_option="MODEL.DEVICE")
    with contextlib.ExitStack() as stack:
        stack.callback(destroy_distributed, env)
        return (_test if test else _train)(args, env, cfg, stack)


def train_net(argv: Optional[Sequence[str]] = None) -> int:
    """Train (then evaluate unless ``--skip-test``); 0 on success or after a stop signal."""
    return _run(argv, test=False)


def test_net(argv: Optional[Sequence[str]] = None) -> int:
    """Evaluate a checkpoint on DATASETS.TEST."""
    return _run(argv, test=True)


def _main(run: Callable[[], int]) -> int:
    try:
        return run_cli(run)
    except ExpectedResultsError as exc:
        report(exc)
        return EXIT_EXPECTED_RESULTS


def train_net_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success or a clean stop, 2 on bad input, 3 on NaN/Inf, 4 when the final
    metrics miss TEST.EXPECTED_RESULTS."""
    return _main(lambda: train_net(argv))


def test_net_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success, 2 on bad input, 4 when the metrics miss TEST.EXPECTED_RESULTS."""
    return _main(lambda: test_net(argv))
