"""Command-line flags and ``--config`` files.

The flags of the published ``cls/train.py`` keep their names and defaults; the rest are
additions (see ``docs/cls.md``). A ``--config FILE`` (yaml, a flat mapping from flag names to
values, e.g. ``configs/cls/mabn_b2.yaml``) replaces the defaults, and flags given explicitly on
the command line override the file: the file is turned into command-line tokens that are parsed
*before* the real ones, so for every flag the last occurrence wins.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Set

import yaml

import mabn
from mabn.utils.errors import UserError
from mabn.utils.yaml_config import load_yaml_unique_keys

__all__ = ["ARCHS", "NORMS", "MABN_DEFAULT_NORM_BATCH", "build_parser", "config_tokens", "explicit_flags", "layer_default",
           "parse_args", "resolve"]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet8", "resnet14", "resnet20")
# --norm takes the core's norm names (mabn.NORM_NAMES), lower-cased and case-insensitive; no "none".
NORMS = tuple(name.lower() for name in mabn.NORM_NAMES if name)
DATASETS = ("imagefolder", "synthetic")
DIFFICULTY_NAMES = ("hard", "easy")  # the levels of cls.embedded_dataset.DIFFICULTIES (not imported: OpenCV)
DEVICES = ("auto", "cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UserError` instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _lower(text: str) -> str:
    return str(text).lower()


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


_positive_int.__name__ = "positive int"
_non_negative_int.__name__ = "non-negative int"
_finite_float.__name__ = "float"


def layer_default(layer: type, name: str):
    """The default of constructor argument ``name`` of ``layer``: the layers own their published defaults."""
    return inspect.signature(layer).parameters[name].default


MABN_DEFAULT_NORM_BATCH: int = layer_default(mabn.MABN2d, "B")  # the published MABN2d split the batch into pairs


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The trainer's flags. With ``suppress_defaults`` only flags actually given appear."""
    parser = _Parser(
        prog="cls/train.py",
        description="ResNet on ImageNet (or the embedded dataset) with small normalization batches",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )

    def add(*names, default=None, **kwargs):
        if not suppress_defaults:
            kwargs["default"] = default
        parser.add_argument(*names, **kwargs)

    _add_published_flags(add)
    _add_norm_flags(add)
    _add_run_flags(add)
    return parser


_Add = Callable[..., None]
_FLAG = argparse.BooleanOptionalAction


def _add_published_flags(add: _Add) -> None:
    """The published trainer's flags, with its names and defaults."""
    add("--batch_size", type=_positive_int, default=256, help="global SGD batch over all processes")
    add("--total_epoch", type=_positive_int, default=120, help="epochs of --iters_per_epoch iterations")
    add("--learning_rate", type=_finite_float, default=0.1, help="initial learning rate")
    add("--momentum", type=_finite_float, default=0.9, help="SGD momentum")
    add("--weight_decay", type=_finite_float, default=1e-4, help="weight decay, on every parameter")
    add("--save", type=str, default="./MABN", help="output directory (checkpoint, log, TensorBoard)")
    add("--save_interval", type=_positive_int, default=2, help="save a checkpoint every N epochs (and at the end)")
    add("--train_dir", type=str, default=None, help="ImageFolder training set; without it the embedded dataset is used")
    add("--val_dir", type=str, default=None, help="ImageFolder validation set")
    add("--checkpoint_dir", type=str, default=None,
        help="checkpoint file (or a directory holding checkpoint.pth) to resume from or test")
    add("--test_only", action=_FLAG, default=False, help="only evaluate the checkpoint")
    add("--local_rank", "--local-rank", type=int, default=None, dest="local_rank",
        help="set by torch.distributed.launch; LOCAL_RANK is used when present")
    add("--gpu_num", type=_positive_int, default=None, help="number of processes; must equal the world size")
    add("--record_statistics", action=_FLAG, default=False,
        help="log mu_B, sigma^2_B, g_B and Psi_B of every batch-norm layer to TensorBoard")


def _add_norm_flags(add: _Add) -> None:
    """``--config`` and the normalization layer with its per-norm settings."""
    add("--config", type=str, default=None, help="yaml file of flag values (command-line flags override it)")
    add("--norm", type=_lower, choices=NORMS, default="mabn", help="normalization layer")
    add("--norm_batch", type=_positive_int, default=None,
        help="normalization batch b (default: the per-process batch; 2 for mabn, as published)")
    add("--ma_batch", type=_positive_int, default=layer_default(mabn.MABN2d, "real_B"),
        help="MABN moving-average batch (real_B)")
    add("--warmup_iters", type=_non_negative_int, default=layer_default(mabn.MABN2d, "warmup_iters"),
        help="MABN iterations with the group's own statistics")
    add("--mabn_r_warmup", type=_non_negative_int, default=None,
        help="MABN iterations with r = 1 before r is clamped to [1/r_max, r_max] (default: max(1000, --warmup_iters))")
    add("--mabn_first_batch_var", action=_FLAG, default=False,
        help="MABN running_var starts from the first batch's statistic instead of 1 (the published ImageNet layer)")
    add("--mabn_fused_statistics", action=_FLAG, default=False,
        help="MABN's per-channel bookkeeping as one Triton kernel per pass on CUDA (needs Triton; not yet measured "
             "on a GPU)")
    add("--brn_warmup", type=_non_negative_int, default=layer_default(mabn.BatchRenorm2d, "warmup_steps"),
        help="Batch Renorm iterations of plain batch norm (r = 1, d = 0) before the ramps start")
    add("--brn_r_ramp_end", type=_non_negative_int, default=layer_default(mabn.BatchRenorm2d, "r_ramp_end"),
        help="Batch Renorm iteration at which r_max reaches --brn_r_max (linear ramp from 1 after --brn_warmup)")
    add("--brn_d_ramp_end", type=_non_negative_int, default=layer_default(mabn.BatchRenorm2d, "d_ramp_end"),
        help="Batch Renorm iteration at which d_max reaches --brn_d_max (linear ramp from 0 after --brn_warmup)")
    add("--brn_r_max", type=_finite_float, default=layer_default(mabn.BatchRenorm2d, "r_max"),
        help="Batch Renorm final clamp of r to [1/r_max, r_max] (>= 1)")
    add("--brn_d_max", type=_finite_float, default=layer_default(mabn.BatchRenorm2d, "d_max"),
        help="Batch Renorm final clamp of d to [-d_max, d_max] (>= 0)")
    add("--gn_groups", type=_positive_int, default=32, help="GroupNorm groups (reduced to gcd(C, groups) per layer)")


def _add_run_flags(add: _Add) -> None:
    """Network, schedule, data, device and output flags added to the published ones."""
    add("--arch", type=_lower, choices=ARCHS, default="resnet50", help="network")
    add("--image_size", type=_positive_int, default=224, help="training crop; validation resizes to size*256/224")
    add("--num_classes", type=_positive_int, default=None, help="classifier outputs (default: the dataset's classes)")
    add("--iters_per_epoch", type=_positive_int, default=5000, help="iterations per epoch")
    add("--lr_milestones", type=_positive_int, nargs="*", default=[30, 60, 90, 120],
        help="epochs after which the learning rate is multiplied by 0.1")
    add("--eval_interval", type=_non_negative_int, default=0,
        help="evaluate every N epochs (0: only after the last one)")
    add("--val_batch_size", type=_positive_int, default=200, help="per-process validation batch")
    add("--workers", type=_non_negative_int, default=None,
        help="data loading processes per training process (default: min(8, CPUs per process))")
    add("--seed", type=_non_negative_int, default=0, help="seed of initialization, data order and augmentation")
    add("--device", type=_lower, choices=DEVICES, default="auto", help="auto: cuda when available")
    add("--amp", action=_FLAG, default=False, help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    add("--dataset", type=_lower, choices=DATASETS, default=None,
        help="imagefolder (--train_dir/--val_dir) or synthetic (default when no --train_dir)")
    add("--data_cache", type=str, default=None,
        help="cache directory of the embedded dataset (default: $MABN_CACHE or ~/.cache/mabn)")
    add("--data_seed", type=_non_negative_int, default=0, help="seed of the embedded dataset's images")
    add("--synthetic_classes", type=_positive_int, default=16, help="classes of the embedded dataset (2-16)")
    add("--synthetic_train_per_class", type=_positive_int, default=600, help="embedded training images per class")
    add("--synthetic_val_per_class", type=_positive_int, default=100, help="embedded validation images per class")
    add("--synthetic_image_size", type=_positive_int, default=40, help="side of the embedded images (pixels)")
    add("--synthetic_difficulty", type=_lower, choices=DIFFICULTY_NAMES, default="hard",
        help="clutter of the embedded images: hard (distractors, lines, any rotation) or easy (one upright target)")
    add("--export_folded", type=str, default=None, help="write the folded inference model (mabn.fold) to PATH")
    add("--stat_channel", type=_non_negative_int, default=0, help="channel logged by --record_statistics")
    add("--stat_interval", type=_positive_int, default=1, help="--record_statistics every N iterations")
    add("--log_interval", type=_positive_int, default=20, help="TensorBoard training scalars every N iterations")
    add("--progress", action=_FLAG, default=True, help="tqdm progress bar on rank 0")
    add("--overwrite", action=_FLAG, default=False,
        help="start over in a --save folder that already holds a checkpoint")
    add("--trust_checkpoint", action=_FLAG, default=False,
        help="load a trusted legacy checkpoint with pickle (weights_only=False); never use it on files from others")


def _actions_by_dest(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def config_tokens(path: str, parser: Optional[argparse.ArgumentParser] = None) -> List[str]:
    """Read a yaml config and return the equivalent command-line tokens."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = load_yaml_unique_keys(handle)
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid yaml ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not a text file (byte {exc.start} is not UTF-8); "
                        f"pass a yaml file of flag values") from None
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = _actions_by_dest(parser or build_parser())
    tokens: List[str] = []
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions or key == "config":
            valid = ", ".join(sorted(k for k in actions if k != "config"))
            raise UserError(f"--config {path}: unknown key {raw_key!r}; valid keys: {valid}")
        if value is None:
            continue
        action = actions[key]
        option = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} must be true or false, got {value!r}")
            tokens.append(option if value else "--no-" + option[2:])
        elif action.nargs in ("*", "+"):
            values = value if isinstance(value, (list, tuple)) else [value]
            tokens.extend([option] + [str(v) for v in values])
        else:
            if isinstance(value, (list, tuple, dict)) or isinstance(value, bool):
                raise UserError(f"--config {path}: {key} expects a single value, got {value!r}")
            tokens.append(f"{option}={value}")  # "=": a value such as -inf must not read as a flag
    try:
        build_parser(suppress_defaults=True).parse_args(tokens)
    except UserError as exc:
        raise UserError(f"--config {path}: {exc}") from None
    return tokens


def explicit_flags(argv: Sequence[str]) -> Set[str]:
    """Names (dests) of the flags given on the command line ``argv``."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(list(argv))))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults, then the ``--config`` file, then the explicit command-line flags.

    The namespace gets two extra attributes: ``explicit`` (flags from the command line) and
    ``from_config`` (flags from the config file).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = explicit_flags(argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    tokens: List[str] = []
    if first.config:
        tokens = config_tokens(first.config, parser)
    args = parser.parse_args(tokens + argv)
    args.explicit = sorted(explicit)
    args.from_config = sorted(set(vars(build_parser(suppress_defaults=True).parse_args(tokens))) - explicit)
    return args


BATCH_NORMS = ("bn", "brn", "mabn")  # the norms whose normalization batch --norm_batch sets

# Flags that only one kind of norm reads: giving them with another --norm is reported as a warning.
_NORM_SPECIFIC_FLAGS = {
    "norm_batch": BATCH_NORMS + ("syncbn",), "ma_batch": ("mabn",), "warmup_iters": ("mabn",),
    "mabn_r_warmup": ("mabn",), "mabn_first_batch_var": ("mabn",), "mabn_fused_statistics": ("mabn",),
    "brn_warmup": ("brn",), "brn_r_ramp_end": ("brn",), "brn_d_ramp_end": ("brn",),
    "brn_r_max": ("brn",), "brn_d_max": ("brn",), "gn_groups": ("gn",),
}


def warn_on_stderr(message: str) -> None:
    """``warning: <message>`` on stderr, from rank 0 only (``RANK`` unset or 0)."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _warn_unused_flags(args: argparse.Namespace, warn: Callable[[str], None]) -> None:
    given = set(getattr(args, "explicit", ())) | set(getattr(args, "from_config", ()))
    unused = [f"--{flag} ({', '.join(norms)})" for flag, norms in _NORM_SPECIFIC_FLAGS.items()
              if flag in given and args.norm not in norms]
    if unused:
        warn(f"--norm {args.norm} ignores {', '.join(unused)}: each applies only to the norms named")


def _check_writable_dir(flag: str, path: str) -> None:
    """``path`` is a directory, or one can be created there: no file in the way, a writable ancestor."""
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"{flag} {path} is a file, not a directory; give a directory (it is created if missing)")
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, so the directory cannot be created; "
                        f"choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose a directory you can write to")


def _check_paths(args: argparse.Namespace) -> None:
    """Output paths that would fail only after training: checked before any work."""
    _check_writable_dir("--save", args.save)
    if args.dataset == "synthetic":
        from cls.embedded_dataset import dataset_name, default_cache_dir

        cache = args.data_cache if args.data_cache is not None else str(default_cache_dir())
        name = dataset_name(args.data_seed, args.synthetic_classes, args.synthetic_train_per_class,
                            args.synthetic_val_per_class, args.synthetic_image_size, args.synthetic_difficulty)
        written = os.path.isfile(os.path.join(os.path.expanduser(cache), name, "meta.json"))
        if not written:  # a finished dataset is only read: a read-only cache is fine then
            _check_writable_dir("--data_cache", cache)
    if args.export_folded is not None:
        target = os.path.abspath(os.path.expanduser(args.export_folded))
        parent = os.path.dirname(target)
        if os.path.isdir(target):
            raise UserError(f"--export_folded {args.export_folded} is a directory; give a file path, "
                            f"e.g. {os.path.join(args.export_folded, 'folded.pth')}")
        if not os.path.isdir(parent):
            raise UserError(f"--export_folded {args.export_folded}: the directory {parent} does not exist; "
                            f"create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"--export_folded {args.export_folded}: the directory {parent} is not writable")


def _check_image_size(args: argparse.Namespace) -> None:
    from cls.models import OUTPUT_STRIDES, min_image_size

    single_value = args.norm == "in" or (args.norm_batch == 1 and args.norm in BATCH_NORMS + ("syncbn",))
    minimum = min_image_size(args.arch, single_value)
    if args.image_size < minimum:
        last = "2x2, as --norm in or a normalization batch of 1 needs" if single_value else "1x1"
        raise UserError(f"--image_size {args.image_size} is too small for {args.arch}, which downsamples "
                        f"{OUTPUT_STRIDES[args.arch]}x: use at least {minimum} (a last feature map of {last})")


def _check_schedules(args: argparse.Namespace) -> None:
    """The Batch Renorm schedule as BatchRenorm2d requires it, checked before any work."""
    for flag in ("brn_r_ramp_end", "brn_d_ramp_end"):
        if getattr(args, flag) < args.brn_warmup:
            raise UserError(f"--{flag} {getattr(args, flag)} must be >= --brn_warmup {args.brn_warmup} "
                            f"(the ramp starts when the warm-up ends); raise it or lower --brn_warmup")
    if args.brn_r_max < 1.0:
        raise UserError(f"--brn_r_max must be >= 1 (r is clamped to [1/r_max, r_max]), got {args.brn_r_max}")
    if args.brn_d_max < 0.0:
        raise UserError(f"--brn_d_max must be >= 0 (d is clamped to [-d_max, d_max]), got {args.brn_d_max}")


def resolve(args: argparse.Namespace, world_size: int,
            warn: Callable[[str], None] = warn_on_stderr) -> argparse.Namespace:
    """Check the flags against each other, the world size and the file system; fill in derived values.

    Adds ``per_gpu_batch`` and resolves ``norm_batch`` and ``dataset``. Raises
    :class:`UserError` with a one-line message; flags that the chosen norm ignores are reported
    through ``warn`` (one line).
    """
    if args.gpu_num is not None and args.gpu_num != world_size:
        raise UserError(f"--gpu_num={args.gpu_num} but the world size is {world_size}; launch "
                        f"{args.gpu_num} processes (e.g. torchrun --nproc_per_node={args.gpu_num}) or drop --gpu_num")
    if args.batch_size % world_size != 0:
        raise UserError(f"--batch_size {args.batch_size} is not divisible by the world size {world_size}")
    args.per_gpu_batch = args.batch_size // world_size
    if args.norm in BATCH_NORMS:
        if args.norm_batch is None:
            # The published MABN normalizes pairs of images; BN and BRN default to the whole local batch.
            args.norm_batch = MABN_DEFAULT_NORM_BATCH if args.norm == "mabn" else args.per_gpu_batch
        if args.per_gpu_batch % args.norm_batch != 0:
            raise UserError(f"the per-process batch {args.per_gpu_batch} (--batch_size {args.batch_size} / "
                            f"{world_size} processes) is not divisible by --norm_batch {args.norm_batch}")
        if args.norm == "mabn" and args.ma_batch % args.norm_batch != 0:
            raise UserError(f"--ma_batch {args.ma_batch} must be a multiple of --norm_batch {args.norm_batch} "
                            f"(MABN averages over ma_batch / norm_batch groups)")
    elif args.norm == "syncbn":
        if args.norm_batch not in (None, args.batch_size):
            raise UserError(f"--norm syncbn normalizes over the global batch ({args.batch_size}); "
                            f"--norm_batch {args.norm_batch} does not apply (use --norm bn for a smaller one)")
        args.norm_batch = args.batch_size
    else:
        args.norm_batch = None  # GN / IN / LN / FrozenBN do not depend on the batch
    if args.record_statistics and args.norm not in BATCH_NORMS + ("syncbn",):
        raise UserError(f"--record_statistics needs a batch normalization (bn, brn, mabn, syncbn), got --norm {args.norm}")
    if not 2 <= args.synthetic_classes <= 16:
        raise UserError(f"--synthetic_classes must lie in 2..16, got {args.synthetic_classes}")
    if list(args.lr_milestones) != sorted(args.lr_milestones):
        raise UserError(f"--lr_milestones must be increasing, got {args.lr_milestones}")
    if args.learning_rate <= 0 or args.momentum < 0 or args.weight_decay < 0:
        raise UserError("--learning_rate must be > 0, --momentum and --weight_decay >= 0")
    _check_schedules(args)

    has_dirs = args.train_dir is not None or args.val_dir is not None
    if args.dataset is None:
        args.dataset = "imagefolder" if has_dirs else "synthetic"
    if args.dataset == "synthetic" and has_dirs:
        raise UserError("--dataset synthetic uses the embedded dataset; drop --train_dir/--val_dir "
                        "(or use --dataset imagefolder)")
    if args.dataset == "imagefolder":
        if args.val_dir is None:
            raise UserError("--val_dir is required with an ImageFolder dataset")
        if args.train_dir is None and not args.test_only:
            raise UserError("--train_dir is required for training (or pass --test_only)")
    if args.test_only and args.checkpoint_dir is None:
        raise UserError("--test_only needs --checkpoint_dir (the checkpoint to evaluate)")
    _check_image_size(args)
    _check_paths(args)
    _warn_unused_flags(args, warn)
    return args
