"""cls.config: published defaults, --config files overridden by explicit flags, cross-checks."""
from __future__ import annotations

import argparse

import pytest
from cls_helpers import REPO

from cls.config import config_tokens, explicit_flags, parse_args, resolve
from mabn.utils.errors import UserError

CONFIGS = REPO / "configs" / "cls"


def test_published_defaults():
    args = parse_args([])
    assert (args.batch_size, args.total_epoch, args.learning_rate, args.momentum, args.weight_decay) == \
        (256, 120, 0.1, 0.9, 1e-4)
    assert (args.save, args.save_interval, args.iters_per_epoch) == ("./MABN", 2, 5000)
    assert (args.norm, args.arch, args.image_size, args.ma_batch) == ("mabn", "resnet50", 224, 32)
    assert args.lr_milestones == [30, 60, 90, 120]
    assert not args.test_only and not args.record_statistics and args.checkpoint_dir is None
    assert (args.warmup_iters, args.mabn_r_warmup) == (100, None)
    assert (args.brn_warmup, args.brn_r_ramp_end, args.brn_d_ramp_end, args.brn_r_max, args.brn_d_max) == \
        (5000, 40000, 25000, 3.0, 5.0)
    assert args.overwrite is False and args.trust_checkpoint is False


def test_layer_defaults_are_the_layers_own():
    """The defaults of the norm flags are read from the layer constructors, not repeated here."""
    import inspect

    import mabn
    from cls.config import MABN_DEFAULT_NORM_BATCH

    mabn_defaults = inspect.signature(mabn.MABN2d).parameters
    brn_defaults = inspect.signature(mabn.BatchRenorm2d).parameters
    args = parse_args([])
    assert MABN_DEFAULT_NORM_BATCH == mabn_defaults["B"].default == 2
    assert (args.ma_batch, args.warmup_iters) == (mabn_defaults["real_B"].default, mabn_defaults["warmup_iters"].default)
    assert (args.brn_warmup, args.brn_r_ramp_end, args.brn_d_ramp_end, args.brn_r_max, args.brn_d_max) == tuple(
        brn_defaults[k].default for k in ("warmup_steps", "r_ramp_end", "d_ramp_end", "r_max", "d_max"))


def test_new_flags_from_config_and_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("overwrite: true\ntrust_checkpoint: true\nbrn_warmup: 10\nbrn_r_ramp_end: 40\n"
                      "brn_d_ramp_end: 30\nbrn_r_max: 2.5\nbrn_d_max: 1.5\nmabn_r_warmup: 7\n")
    args = parse_args(["--config", str(config)])
    assert args.overwrite and args.trust_checkpoint and args.mabn_r_warmup == 7
    assert (args.brn_warmup, args.brn_r_ramp_end, args.brn_d_ramp_end, args.brn_r_max, args.brn_d_max) == \
        (10, 40, 30, 2.5, 1.5)
    args = parse_args(["--config", str(config), "--no-overwrite", "--no-trust_checkpoint", "--brn_r_max", "1"])
    assert not args.overwrite and not args.trust_checkpoint and args.brn_r_max == 1.0


@pytest.mark.parametrize("argv, fragment", [
    (["--brn_warmup", "100", "--brn_r_ramp_end", "50"], "--brn_r_ramp_end 50 must be >= --brn_warmup 100"),
    (["--brn_warmup", "30000"], "--brn_d_ramp_end 25000 must be >= --brn_warmup 30000"),
    (["--brn_r_max", "0.5"], "--brn_r_max must be >= 1"),
    (["--brn_d_max", "-1"], "--brn_d_max must be >= 0"),
    (["--mabn_r_warmup", "-1"], "expected an integer >= 0"),
])
def test_schedule_constraints(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        _resolve(["--norm", "brn", "--batch_size", "8", *argv])


def test_short_brn_schedule_is_accepted():
    args = _resolve(["--norm", "brn", "--batch_size", "8", "--brn_warmup", "0", "--brn_r_ramp_end", "0",
                     "--brn_d_ramp_end", "0", "--brn_r_max", "1", "--brn_d_max", "0"])
    assert (args.brn_warmup, args.brn_r_ramp_end, args.brn_r_max, args.brn_d_max) == (0, 0, 1.0, 0.0)


def test_config_sets_defaults_and_explicit_flags_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("norm: bn\nnorm_batch: 2\nbatch_size: 64\nrecord_statistics: true\nlr_milestones: [1, 2]\n")
    args = parse_args(["--config", str(config), "--batch_size", "32", "--no-record_statistics"])
    assert args.norm == "bn" and args.norm_batch == 2 and args.lr_milestones == [1, 2]
    assert args.batch_size == 32 and args.record_statistics is False
    assert "batch_size" in args.explicit and "norm" in args.from_config and "batch_size" not in args.from_config


def test_flags_before_config_still_win(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("arch: resnet18\n")
    assert parse_args(["--arch", "resnet20", "--config", str(config)]).arch == "resnet20"


@pytest.mark.parametrize("text, fragment", [
    ("nrom: bn\n", "unknown key 'nrom'"),
    ("norm: batchnorm\n", "invalid choice"),
    ("batch_size: [1, 2]\n", "single value"),
    ("amp: 3\n", "true or false"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_config_files(tmp_path, text, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(UserError, match=fragment):
        parse_args(["--config", str(config)])


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_args(["--config", str(tmp_path / "none.yaml")])


@pytest.mark.parametrize("name", ["bn_b32", "bn_b2", "brn_b2", "gn_b2", "mabn_b2", "syncbn",
                                  "demo_resnet20_mabn_b2", "demo_resnet20_bn_b32", "demo_resnet20_brn_b2"])
def test_shipped_configs_parse_and_resolve(name):
    path = CONFIGS / f"{name}.yaml"
    assert config_tokens(str(path)) is not None
    args = parse_args(["--config", str(path)])
    world = 1 if name.startswith("demo") else 8
    resolve(args, world)
    if name.startswith("demo"):
        assert args.arch == "resnet20" and args.dataset == "synthetic"
    else:
        assert args.arch == "resnet50" and args.batch_size == 256 and args.per_gpu_batch == 32


def test_paper_configs_norm_batches():
    def resolved(name):
        return resolve(parse_args(["--config", str(CONFIGS / f"{name}.yaml")]), 8)
    assert (resolved("bn_b32").norm, resolved("bn_b32").norm_batch) == ("bn", 32)
    assert (resolved("bn_b2").norm, resolved("bn_b2").norm_batch) == ("bn", 2)
    assert (resolved("brn_b2").norm, resolved("brn_b2").norm_batch) == ("brn", 2)
    mabn = resolved("mabn_b2")
    assert (mabn.norm, mabn.norm_batch, mabn.ma_batch) == ("mabn", 2, 32)
    assert resolved("gn_b2").norm == "gn" and resolved("syncbn").norm == "syncbn"
    brn = resolved("brn_b2")
    assert (brn.brn_warmup, brn.brn_r_ramp_end, brn.brn_d_ramp_end, brn.brn_r_max, brn.brn_d_max) == \
        (5000, 40000, 25000, 3.0, 5.0)


def test_shipped_configs_need_no_warning():
    for path in sorted(CONFIGS.glob("*.yaml")):
        warnings = []
        resolve(parse_args(["--config", str(path)]), 1 if path.name.startswith("demo") else 8, warn=warnings.append)
        assert warnings == [], path.name


def test_local_rank_spellings():
    assert parse_args(["--local_rank", "3"]).local_rank == 3
    assert parse_args(["--local-rank=2"]).local_rank == 2
    assert explicit_flags(["--local-rank=2", "--amp"]) == {"local_rank", "amp"}


def _resolve(argv, world=1):
    return resolve(parse_args(argv), world)


def test_resolve_defaults_and_divisibility():
    args = _resolve(["--batch_size", "64", "--norm", "bn"], world=2)
    assert args.per_gpu_batch == 32 and args.norm_batch == 32 and args.dataset == "synthetic"
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        _resolve(["--batch_size", "64"], world=3)
    with pytest.raises(UserError, match="not divisible by --norm_batch 3"):
        _resolve(["--batch_size", "16", "--norm", "bn", "--norm_batch", "3"])
    with pytest.raises(UserError, match="multiple of --norm_batch"):
        _resolve(["--batch_size", "16", "--norm_batch", "4", "--ma_batch", "6"])
    with pytest.raises(UserError, match="--gpu_num=8 but the world size is 2"):
        _resolve(["--gpu_num", "8"], world=2)


def test_resolve_dataset_rules(tmp_path):
    assert _resolve(["--train_dir", "a", "--val_dir", "b"]).dataset == "imagefolder"
    with pytest.raises(UserError, match="--val_dir is required"):
        _resolve(["--train_dir", "a"])
    with pytest.raises(UserError, match="--train_dir is required"):
        _resolve(["--dataset", "imagefolder", "--val_dir", "b"])
    with pytest.raises(UserError, match="drop --train_dir"):
        _resolve(["--dataset", "synthetic", "--train_dir", "a"])
    with pytest.raises(UserError, match="--test_only needs --checkpoint_dir"):
        _resolve(["--test_only"])


def test_norms_without_batch_ignore_norm_batch():
    assert _resolve(["--norm", "gn", "--norm_batch", "2", "--batch_size", "16"]).norm_batch is None
    assert _resolve(["--norm", "syncbn", "--batch_size", "16"], world=2).norm_batch == 16
    with pytest.raises(UserError, match="does not apply"):
        _resolve(["--norm", "syncbn", "--norm_batch", "2", "--batch_size", "16"])
    with pytest.raises(UserError, match="--record_statistics needs a batch normalization"):
        _resolve(["--norm", "gn", "--record_statistics"])


def test_argparse_errors_are_user_errors():
    with pytest.raises(UserError, match="invalid choice: 'foo'.*mabn"):
        parse_args(["--norm", "foo"])
    with pytest.raises(UserError, match="invalid choice: 'vgg16'.*resnet20"):
        parse_args(["--arch", "vgg16"])
    with pytest.raises(UserError, match="unrecognized arguments"):
        parse_args(["--bogus"])
    assert isinstance(parse_args(["--norm", "MABN"]), argparse.Namespace)


def test_norm_choices_are_the_core_names():
    import mabn
    from cls.config import NORMS

    assert set(NORMS) == {"bn", "brn", "gn", "in", "ln", "syncbn", "mabn", "frozenbn"}  # what the CLI always took
    assert all(mabn.resolve_norm_name(n).lower() == n for n in NORMS)
    assert {mabn.resolve_norm_name(n) for n in NORMS} == set(mabn.NORM_NAMES) - {""}
    for spelling in ("MABN", "SyncBN", "frozenBN", "gn"):
        assert parse_args(["--norm", spelling]).norm == spelling.lower()
    for missing in ("", "none"):
        with pytest.raises(UserError, match="invalid choice"):
            parse_args(["--norm", missing])


def test_mabn_default_norm_batch_is_the_published_pair():
    args = _resolve([], world=8)
    assert (args.norm, args.per_gpu_batch, args.norm_batch, args.ma_batch) == ("mabn", 32, 2, 32)
    assert _resolve(["--norm", "brn", "--batch_size", "16"]).norm_batch == 16


FLOAT_FLAGS = ["learning_rate", "momentum", "weight_decay", "brn_r_max", "brn_d_max"]


def test_every_float_flag_is_listed():
    from cls.config import build_parser

    floats = {a.dest for a in build_parser()._actions if getattr(a.type, "__name__", "") == "float"}
    assert floats == set(FLOAT_FLAGS)


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_floats_are_rejected(flag, value):
    with pytest.raises(UserError, match=f"argument --{flag}: expected a finite number, got {value}"):
        parse_args([f"--{flag}={value}"])
    with pytest.raises(UserError, match=f"argument --{flag}"):  # "-inf" reads as a flag: an error as well
        parse_args([f"--{flag}", value])


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_in_config_are_rejected(tmp_path, flag, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"{flag}: {value}\n")
    with pytest.raises(UserError, match=f"--config {config}: argument --{flag}: expected a finite number"):
        parse_args(["--config", str(config)])


def test_binary_config_file(tmp_path):
    config = tmp_path / "model.pth"
    config.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"--config .*model.pth: not a text file \(byte 128 is not UTF-8\)") as info:
        parse_args(["--config", str(config)])
    assert "\n" not in str(info.value)
    config.write_bytes(b"norm: bn\n\x00\x01\x02")  # UTF-8, but not yaml
    with pytest.raises(UserError, match="not valid yaml"):
        parse_args(["--config", str(config)])


def test_duplicate_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("norm: bn\nbatch_size: 8\nnorm: mabn\n")
    with pytest.raises(UserError, match=r"key 'norm' appears twice \(lines 1 and 3\); keep one") as info:
        parse_args(["--config", str(config)])
    assert "\n" not in str(info.value)
    config.write_text("norm: bn\nlr_milestones: [1, 2]\nbatch_size: 8\n")  # no duplicates: fine
    assert parse_args(["--config", str(config)]).norm == "bn"


@pytest.mark.parametrize("arch, norm, extra, minimum", [
    ("resnet20", "bn", [], 4),
    ("resnet20", "in", [], 8),
    ("resnet20", "bn", ["--batch_size", "1"], 8),  # one sample per batch-norm group
    ("resnet18", "mabn", [], 32),
    ("resnet50", "in", [], 64),
])
def test_image_size_minimum(arch, norm, extra, minimum):
    argv = ["--arch", arch, "--norm", norm, "--batch_size", "8", *extra]
    assert _resolve([*argv, "--image_size", str(minimum)]).image_size == minimum
    with pytest.raises(UserError, match=f"--image_size {minimum - 1} is too small for {arch}.*use at least {minimum}"):
        _resolve([*argv, "--image_size", str(minimum - 1)])
    with pytest.raises(UserError, match="--image_size 1 is too small"):
        _resolve([*argv, "--image_size", "1"])


def test_output_paths_that_are_files(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"--save {a_file} is a file, not a directory"):
        _resolve(["--save", str(a_file)])
    with pytest.raises(UserError, match=f"--save {a_file}/run: {a_file} is a file"):
        _resolve(["--save", str(a_file / "run")])
    with pytest.raises(UserError, match=f"--data_cache {a_file} is a file, not a directory"):
        _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(a_file)])
    # Missing directories below a writable one are fine: they are created.
    args = _resolve(["--save", str(tmp_path / "a" / "b"), "--data_cache", str(tmp_path / "c" / "d")])
    assert args.save == str(tmp_path / "a" / "b") and not (tmp_path / "a").exists()


def test_data_cache_is_only_checked_for_the_embedded_dataset(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(a_file), "--train_dir", "t", "--val_dir", "v"])
    assert args.dataset == "imagefolder"


def test_unwritable_output_directories(tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    with pytest.raises(UserError, match=f"--save {locked}/run: {locked} is not writable"):
        _resolve(["--save", str(locked / "run")])
    with pytest.raises(UserError, match=f"--data_cache {locked}: {locked} is not writable"):
        _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(locked)])
    with pytest.raises(UserError, match=f"--export_folded {locked}/f.pth: the directory {locked} is not writable"):
        _resolve(["--save", str(tmp_path / "run"), "--export_folded", str(locked / "f.pth")])


def test_read_only_cache_holding_the_dataset_is_fine(tmp_path, monkeypatch):
    import os

    from cls.embedded_dataset import dataset_name

    cache = tmp_path / "cache"
    (cache / dataset_name(0, 16, 600, 100, 40)).mkdir(parents=True)
    (cache / dataset_name(0, 16, 600, 100, 40) / "meta.json").write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(cache)) and real_access(path, mode))
    assert _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(cache)]).data_cache == str(cache)
    with pytest.raises(UserError, match="is not writable"):
        _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(cache), "--data_seed", "1"])
    with pytest.raises(UserError, match="is not writable"):  # another difficulty: another dataset to write
        _resolve(["--save", str(tmp_path / "run"), "--data_cache", str(cache), "--synthetic_difficulty", "easy"])


def test_synthetic_difficulty_choices():
    assert parse_args([]).synthetic_difficulty == "hard"
    assert parse_args(["--synthetic_difficulty", "EASY"]).synthetic_difficulty == "easy"
    with pytest.raises(UserError, match="invalid choice: 'medium'"):
        parse_args(["--synthetic_difficulty", "medium"])


def test_export_folded_path(tmp_path):
    save = ["--save", str(tmp_path / "run")]
    with pytest.raises(UserError, match=f"--export_folded {tmp_path} is a directory; give a file path, "
                                        f"e.g. {tmp_path}/folded.pth"):
        _resolve([*save, "--export_folded", str(tmp_path)])
    with pytest.raises(UserError, match=f"the directory {tmp_path}/none does not exist; create it first"):
        _resolve([*save, "--export_folded", str(tmp_path / "none" / "f.pth")])
    (tmp_path / "f.pth").write_text("old")  # an existing file is replaced
    assert _resolve([*save, "--export_folded", str(tmp_path / "f.pth")]).export_folded == str(tmp_path / "f.pth")


@pytest.mark.parametrize("argv, ignored", [
    (["--norm", "gn", "--norm_batch", "3"], ["--norm_batch"]),
    (["--norm", "bn", "--ma_batch", "16", "--warmup_iters", "5"], ["--ma_batch", "--warmup_iters"]),
    (["--norm", "mabn", "--brn_warmup", "10", "--gn_groups", "8"], ["--brn_warmup", "--gn_groups"]),
    (["--norm", "bn", "--mabn_r_warmup", "5", "--brn_r_max", "2", "--brn_d_max", "1", "--brn_r_ramp_end", "9000",
      "--brn_d_ramp_end", "9000"], ["--mabn_r_warmup", "--brn_r_max", "--brn_d_max", "--brn_r_ramp_end",
                                    "--brn_d_ramp_end"]),
])
def test_flags_the_norm_ignores_are_warned_about(tmp_path, argv, ignored):
    warnings = []
    _resolve_args = parse_args(["--save", str(tmp_path), "--batch_size", "8", *argv])
    resolve(_resolve_args, 1, warn=warnings.append)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"--norm {_resolve_args.norm} ignores")
    for flag in ignored:
        assert flag in warnings[0]


def test_no_warning_when_every_flag_applies(tmp_path):
    warnings = []
    config = tmp_path / "c.yaml"
    config.write_text("ma_batch: 8\n")
    resolve(parse_args(["--save", str(tmp_path), "--config", str(config), "--norm", "brn", "--norm_batch", "2",
                        "--brn_warmup", "3", "--batch_size", "8"]), 1, warn=warnings.append)
    assert warnings == ["--norm brn ignores --ma_batch (mabn): each applies only to the norms named"]
    warnings.clear()
    resolve(parse_args(["--save", str(tmp_path), "--norm", "mabn", "--norm_batch", "2", "--ma_batch", "8",
                        "--warmup_iters", "3", "--mabn_r_warmup", "9"]), 1, warn=warnings.append)
    assert warnings == []


def test_warning_goes_to_stderr_on_rank_0_only(tmp_path, capsys, monkeypatch):
    argv = ["--save", str(tmp_path), "--norm", "gn", "--norm_batch", "2"]
    monkeypatch.delenv("RANK", raising=False)
    resolve(parse_args(argv), 1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: --norm gn ignores --norm_batch (bn, brn, mabn, syncbn): " \
                                                  "each applies only to the norms named\n"
    monkeypatch.setenv("RANK", "1")
    resolve(parse_args(argv), 1)
    assert capsys.readouterr().err == ""


def test_the_paper_config_builds_the_published_imagenet_layer():
    """configs/cls/mabn_b2.yaml: own statistics at iteration 1 only, r from iteration 100 and
    running_var from the first batch, on 8 processes of 32 images."""
    from cls.norms import norm_choice_from_args

    args = resolve(parse_args(["--config", "configs/cls/mabn_b2.yaml", "--save", "unused"]), world_size=8)
    layer = norm_choice_from_args(args)(16)
    assert (layer.B, layer.real_B, layer.split_batch) == (2, 32, True)
    assert (layer.warmup_iters, layer.r_warmup_iters, layer.first_batch_running_var) == (1, 99, True)
    assert not layer.fused_statistics
    fused = resolve(parse_args(["--config", "configs/cls/mabn_b2.yaml", "--save", "unused", "--mabn_fused_statistics"]),
                    world_size=8)
    assert norm_choice_from_args(fused)(16).fused_statistics
