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
                                  "demo_resnet20_mabn_b2", "demo_resnet20_bn_b32"])
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
