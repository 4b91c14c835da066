"""Normalization layers by name: ``get_norm("MABN", 256)``.

One entry point for the apps (``cls/``, ``det/``) and for users, in the spirit of detectron2's
``get_norm``: configs name a norm, code asks the factory. A callable is accepted wherever a name
is, so ``norm_layer`` arguments stay injectable.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from mabn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from mabn.moving_average_bn import MABN1d, MABN2d, MABN3d
from mabn.sync_batchnorm import SyncBatchNorm

__all__ = ["NORM_CLASSES_BY_DIM", "NORM_NAMES", "get_norm", "norm_class", "resolve_norm_name"]

NormSpec = Union[str, None, Callable[..., nn.Module]]

NORM_CLASSES_BY_DIM: Dict[str, Dict[int, type]] = {
    "BN": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "BRN": {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    "MABN": {1: MABN1d, 2: MABN2d, 3: MABN3d},
    "IN": {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
}

GHOST_BN_BY_DIM: Dict[int, type] = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}

# Every name get_norm accepts, canonical spelling ("" for no norm): the one public list (mabn.NORM_NAMES).
NORM_NAMES = ("BN", "SyncBN", "FrozenBN", "GN", "IN", "LN", "BRN", "MABN", "")


def resolve_norm_name(name: Optional[str]) -> str:
    """Canonical spelling of a norm name (case-insensitive); raises on unknown names."""
    if name is None or name == "" or str(name).lower() == "none":
        return ""
    for known in NORM_NAMES:
        if known and known.lower() == str(name).lower():
            return known
    raise ValueError(f"unknown norm {name!r}; valid names: {', '.join(repr(n) for n in NORM_NAMES)} "
                     f"(case-insensitive; '' or None for no norm), or pass a callable(num_channels)")


def norm_class(name: str, dim: int = 2) -> Optional[type]:
    """The layer class behind a norm name (``None`` for no norm)."""
    name = resolve_norm_name(name)
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (BatchNorm{{dim}}d-style layers), got {dim}")
    if name in NORM_CLASSES_BY_DIM:
        return NORM_CLASSES_BY_DIM[name][dim]
    return {"SyncBN": SyncBatchNorm, "FrozenBN": FrozenBatchNorm2d, "GN": nn.GroupNorm,
            "LN": nn.GroupNorm, "": None}[name]


def get_norm(norm: NormSpec, num_channels: int, *, dim: int = 2, **kwargs) -> nn.Module:
    """Build a normalization layer for ``num_channels`` channels.

    Args:
        norm: "BN", "SyncBN" (torch's SyncBatchNorm on CUDA, an all-reduce version on CPU),
            "FrozenBN", "GN" (``num_groups`` 32 by default), "IN" (affine), "LN" (over C and
            all spatial dims, per-channel affine: ``GroupNorm(1, C)``), "BRN", "MABN", "" or
            None (``nn.Identity``), or a callable ``norm(num_channels, **kwargs)``.
        num_channels: channels C of the (N, C, ...) input.
        dim: spatial dimensionality for BN, BRN, MABN and IN (1, 2 or 3).
        kwargs: forwarded to the layer's constructor (e.g. ``B=2, real_B=32`` for MABN).
            ``B`` is the normalization batch (samples per normalization group) for "BN", "BRN"
            and "MABN": ``get_norm("BN", C, B=b)`` builds ``GhostBatchNorm{dim}d`` (groups of
            ``b`` consecutive samples; plain ``nn.BatchNorm{dim}d`` when ``B`` is absent or
            None), ``get_norm("BRN", C, B=b)`` a ``BatchRenorm{dim}d`` with per-group
            statistics (None: the whole batch), and MABN takes ``B`` as its own argument
            (groups only with ``split_batch=True``).
    """
    if callable(norm) and not isinstance(norm, str):
        return norm(num_channels, **kwargs)
    name = resolve_norm_name(norm)
    if name == "":
        return nn.Identity()
    if name in ("GN", "LN"):
        groups = kwargs.pop("num_groups", 32 if name == "GN" else 1)
        if num_channels % groups != 0:
            raise ValueError(f"GroupNorm with {groups} groups needs num_channels divisible by {groups}, "
                             f"got {num_channels}; pass num_groups=<a divisor of {num_channels}>")
        return nn.GroupNorm(groups, num_channels, **kwargs)
    if name == "IN":
        kwargs.setdefault("affine", True)
    if name == "BN":
        B = kwargs.pop("B", None)  # None: plain whole-batch BatchNorm
        if B is not None:
            norm_class(name, dim)  # validates dim
            return GHOST_BN_BY_DIM[dim](num_channels, B, **kwargs)
    return norm_class(name, dim)(num_channels, **kwargs)
