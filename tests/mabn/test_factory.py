"""Tests for mabn.factory (get_norm, norm_class, resolve_norm_name)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from mabn.factory import NORM_NAMES, get_norm, norm_class, resolve_norm_name
from mabn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from mabn.moving_average_bn import MABN1d, MABN2d, MABN3d
from mabn.sync_batchnorm import SyncBatchNorm

EXPECTED_2D = {
    "BN": nn.BatchNorm2d,
    "SyncBN": SyncBatchNorm,
    "FrozenBN": FrozenBatchNorm2d,
    "GN": nn.GroupNorm,
    "IN": nn.InstanceNorm2d,
    "LN": nn.GroupNorm,
    "BRN": BatchRenorm2d,
    "MABN": MABN2d,
    "": nn.Identity,
}


def test_expected_table_covers_every_name():
    assert set(EXPECTED_2D) == set(NORM_NAMES)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_name_builds_the_expected_class(name):
    m = get_norm(name, 64)
    assert type(m) is EXPECTED_2D[name]
    if name in ("GN", "LN"):
        assert m.num_channels == 64
    elif name != "":
        assert m.weight.shape == (64,)


def test_layer_details():
    sync = get_norm("SyncBN", 8)
    assert isinstance(sync, nn.SyncBatchNorm)
    gn = get_norm("GN", 64)
    assert gn.num_groups == 32 and gn.num_channels == 64 and gn.affine
    assert get_norm("GN", 64, num_groups=16).num_groups == 16
    ln = get_norm("LN", 12)
    assert ln.num_groups == 1 and ln.num_channels == 12 and ln.weight.shape == (12,)
    inorm = get_norm("IN", 8)
    assert inorm.affine and inorm.weight.shape == (8,)
    assert not get_norm("IN", 8, affine=False).affine
    frozen = get_norm("FrozenBN", 8)
    assert "weight" in dict(frozen.named_buffers())  # frozen: buffers, no parameters
    assert list(frozen.parameters()) == []
    assert type(get_norm("BN", 8)) is nn.BatchNorm2d  # not a ghost BN without B


@pytest.mark.parametrize("spelling,canonical", [
    ("bn", "BN"), ("syncbn", "SyncBN"), ("SYNCBN", "SyncBN"), ("frozenbn", "FrozenBN"),
    ("gn", "GN"), ("In", "IN"), ("ln", "LN"), ("brn", "BRN"), ("mabn", "MABN"), ("Mabn", "MABN"),
    ("", ""), (None, ""), ("none", ""), ("None", ""),
])
def test_case_insensitive_names(spelling, canonical):
    assert resolve_norm_name(spelling) == canonical
    assert type(get_norm(spelling, 32)) is EXPECTED_2D[canonical]


def test_none_and_empty_give_identity():
    assert type(get_norm(None, 8)) is nn.Identity
    assert type(get_norm("", 8)) is nn.Identity
    assert norm_class("") is None and norm_class(None) is None


def test_callable_norm_gets_channels_and_kwargs():
    calls = []

    def make(c, **kw):
        calls.append((c, kw))
        return nn.GroupNorm(4, c, **kw)

    m = get_norm(make, 16, eps=1e-3)
    assert calls == [(16, {"eps": 1e-3})] and m.eps == 1e-3
    assert type(get_norm(nn.BatchNorm1d, 5)) is nn.BatchNorm1d
    assert get_norm(lambda c: nn.LayerNorm(c), 7).normalized_shape == (7,)


@pytest.mark.parametrize("dim,expected", [
    (1, {"BN": nn.BatchNorm1d, "BRN": BatchRenorm1d, "MABN": MABN1d, "IN": nn.InstanceNorm1d}),
    (3, {"BN": nn.BatchNorm3d, "BRN": BatchRenorm3d, "MABN": MABN3d, "IN": nn.InstanceNorm3d}),
])
def test_dim(dim, expected):
    for name, cls in expected.items():
        assert type(get_norm(name, 8, dim=dim)) is cls
        assert norm_class(name, dim) is cls
    assert type(get_norm("GN", 64, dim=dim)) is nn.GroupNorm  # dim-agnostic names ignore dim


def test_bad_dim():
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        get_norm("BN", 8, dim=4)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        get_norm("BN", 8, dim=0, B=2)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'") as info:
        get_norm("batchnorm", 8)
    message = str(info.value)
    for name in NORM_NAMES:
        assert repr(name) in message
    assert "case-insensitive" in message and "callable" in message


def test_group_norm_indivisible_channels_hint():
    with pytest.raises(ValueError, match=r"divisible by 32, got 48; pass num_groups="):
        get_norm("GN", 48)
    with pytest.raises(ValueError, match=r"divisible by 5"):
        get_norm("GN", 12, num_groups=5)
    assert get_norm("GN", 48, num_groups=16).num_groups == 16


@pytest.mark.parametrize("dim,cls", [(1, GhostBatchNorm1d), (2, GhostBatchNorm2d),
                                     (3, GhostBatchNorm3d)])
def test_bn_with_B_is_ghost_batchnorm(dim, cls):
    m = get_norm("BN", 8, dim=dim, B=2, momentum=0.05, eps=1e-3)
    assert type(m) is cls and m.B == 2 and m.momentum == 0.05 and m.eps == 1e-3
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)


def test_bn_with_B_none_is_plain_batchnorm():
    m = get_norm("BN", 8, B=None, momentum=0.2)
    assert type(m) is nn.BatchNorm2d and m.momentum == 0.2


def test_bn_B_groups_the_batch():
    torch.manual_seed(0)
    m = get_norm("BN", 3, B=2, affine=False)
    x = torch.randn(4, 3, 2, 2)
    exp = torch.cat([nn.functional.batch_norm(g, None, None, training=True) for g in x.split(2)])
    torch.testing.assert_close(m(x), exp)


def test_brn_passes_B_through():
    m = get_norm("BRN", 8, B=4, warmup_steps=0)
    assert type(m) is BatchRenorm2d and m.B == 4 and m.warmup_steps == 0
    assert get_norm("BRN", 8).B is None
    assert get_norm("BRN", 8, B=None).B is None
    assert type(get_norm("BRN", 8, dim=1, B=2)) is BatchRenorm1d
    with pytest.raises(ValueError, match="B=4"):
        m(torch.randn(6, 8, 2, 2))


def test_mabn_takes_B():
    m = get_norm("MABN", 8, B=4, real_B=32, split_batch=True)
    assert type(m) is MABN2d and m.B == 4 and m.real_B == 32 and m.split_batch


def test_names_are_public_once():
    import mabn

    assert mabn.NORM_NAMES is NORM_NAMES and isinstance(NORM_NAMES, tuple)
    assert mabn.resolve_norm_name is resolve_norm_name
    assert all(resolve_norm_name(name.lower()) == name for name in NORM_NAMES)
