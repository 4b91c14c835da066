"""From ``--norm`` / ``--norm_batch`` to ``mabn.get_norm`` calls and the matching conv class.

==========  ==========================================================================
``--norm``  layer (``b`` = ``--norm_batch``, ``n`` = per-process batch)
==========  ==========================================================================
bn          ``get_norm("BN", C)`` when ``b == n``, else ``get_norm("BN", C, B=b)``: ghost
            batch norm over groups of ``b`` consecutive samples
brn         the same with ``"BRN"`` (Batch Renormalization per group), with the schedule
            ``warmup_steps, r_ramp_end, d_ramp_end, r_max, d_max`` from ``--brn_*``
mabn        ``get_norm("MABN", C, B=b, real_B=ma_batch, warmup_iters=..., split_batch=True)``
            (and ``r_warmup_iters=--mabn_r_warmup`` when given, ``first_batch_running_var`` from
            ``--mabn_first_batch_var``) after ``CenConv2d``
            convolutions (weight centralization)
syncbn      ``get_norm("SyncBN", C)``: statistics of the global batch over all ranks
gn          ``get_norm("GN", C, num_groups=gcd(C, gn_groups))``
in, ln      ``get_norm("IN", C)``, ``get_norm("LN", C)``
frozenbn    ``get_norm("FrozenBN", C)`` (fixed statistics: no normalization at init)
==========  ==========================================================================
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import nn

import mabn
from cls.config import NORMS, layer_default
from mabn.utils.errors import UserError

__all__ = ["NormChoice", "NormSettings", "norm_choice", "norm_choice_from_args"]

_BRN = mabn.BatchRenorm2d


@dataclass(frozen=True)
class NormChoice:
    """A norm by factory name with its constructor options, and the conv class to pair it with."""

    flag: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    conv: type = nn.Conv2d
    gn_groups: int = 32

    def __call__(self, channels: int) -> nn.Module:
        kwargs = dict(self.kwargs)
        if self.name == "GN":
            kwargs["num_groups"] = math.gcd(channels, self.gn_groups)
        return mabn.get_norm(self.name, channels, **kwargs)

    def describe(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        conv = "CenConv2d" if self.conv is not nn.Conv2d else "Conv2d"
        return f"{self.name}({options}) after {conv}" if options else f"{self.name} after {conv}"


@dataclass(frozen=True)
class NormSettings:
    """The flags that only some norms read: MABN's moving-average batch and schedule, Batch
    Renorm's schedule, GroupNorm's group count (defaults: the layers' own)."""

    ma_batch: int = layer_default(mabn.MABN2d, "real_B")
    warmup_iters: int = layer_default(mabn.MABN2d, "warmup_iters")
    mabn_r_warmup: Optional[int] = None
    mabn_first_batch_var: bool = False
    mabn_fused_statistics: bool = False
    gn_groups: int = 32
    brn_warmup: int = layer_default(_BRN, "warmup_steps")
    brn_r_ramp_end: int = layer_default(_BRN, "r_ramp_end")
    brn_d_ramp_end: int = layer_default(_BRN, "d_ramp_end")
    brn_r_max: float = layer_default(_BRN, "r_max")
    brn_d_max: float = layer_default(_BRN, "d_max")


def norm_choice(norm: str, per_gpu_batch: int, norm_batch: Optional[int] = None,
                settings: NormSettings = NormSettings()) -> NormChoice:
    """The layers for ``--norm norm`` with a per-process batch ``per_gpu_batch``."""
    key = norm.lower()
    if key not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    name = mabn.resolve_norm_name(key)
    b = per_gpu_batch if norm_batch is None else norm_batch
    group = {} if b == per_gpu_batch else {"B": b}
    if key == "bn":
        return NormChoice(key, name, group)
    if key == "brn":
        schedule = {"warmup_steps": settings.brn_warmup, "r_ramp_end": settings.brn_r_ramp_end,
                    "d_ramp_end": settings.brn_d_ramp_end, "r_max": settings.brn_r_max, "d_max": settings.brn_d_max}
        return NormChoice(key, name, {**group, **schedule})
    if key == "mabn":
        kwargs = {"B": b, "real_B": settings.ma_batch, "warmup_iters": settings.warmup_iters, "split_batch": True}
        if settings.mabn_r_warmup is not None:
            kwargs["r_warmup_iters"] = settings.mabn_r_warmup
        if settings.mabn_first_batch_var:
            kwargs["first_batch_running_var"] = True
        if settings.mabn_fused_statistics:
            kwargs["fused_statistics"] = True
        return NormChoice(key, name, kwargs, conv=mabn.CenConv2d)
    return NormChoice(key, name, {}, gn_groups=settings.gn_groups)


def norm_choice_from_args(args: argparse.Namespace) -> NormChoice:
    """:func:`norm_choice` for resolved trainer flags (``cls.config.resolve``)."""
    settings = NormSettings(**{name: getattr(args, name) for name in NormSettings.__dataclass_fields__})
    return norm_choice(args.norm, args.per_gpu_batch, args.norm_batch, settings)
