"""From ``--norm`` / ``--norm_batch`` to ``mabn.get_norm`` calls and the matching conv class.

==========  ==========================================================================
``--norm``  layer (``b`` = ``--norm_batch``, ``n`` = per-process batch)
==========  ==========================================================================
bn          ``get_norm("BN", C)`` when ``b == n``, else ``get_norm("BN", C, B=b)``: ghost
            batch norm over groups of ``b`` consecutive samples
brn         the same with ``"BRN"`` (Batch Renormalization per group)
mabn        ``get_norm("MABN", C, B=b, real_B=ma_batch, warmup_iters=..., split_batch=True)``
            after ``CenConv2d`` convolutions (weight centralization)
syncbn      ``get_norm("SyncBN", C)``: statistics of the global batch over all ranks
gn          ``get_norm("GN", C, num_groups=gcd(C, gn_groups))``
in, ln      ``get_norm("IN", C)``, ``get_norm("LN", C)``
frozenbn    ``get_norm("FrozenBN", C)`` (fixed statistics: no normalization at init)
==========  ==========================================================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict

from torch import nn

import mabn
from cls.config import NORMS
from mabn.utils.errors import UserError

__all__ = ["NormChoice", "norm_choice"]


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


def norm_choice(norm: str, per_gpu_batch: int, norm_batch=None, ma_batch: int = 32, warmup_iters: int = 100,
                gn_groups: int = 32) -> NormChoice:
    """The layers for ``--norm norm`` with a per-process batch ``per_gpu_batch``."""
    key = norm.lower()
    if key not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    name = mabn.resolve_norm_name(key)
    b = per_gpu_batch if norm_batch is None else norm_batch
    if key in ("bn", "brn"):
        kwargs = {} if b == per_gpu_batch else {"B": b}
        return NormChoice(key, name, kwargs)
    if key == "mabn":
        kwargs = {"B": b, "real_B": ma_batch, "warmup_iters": warmup_iters, "split_batch": True}
        return NormChoice(key, name, kwargs, conv=mabn.CenConv2d)
    return NormChoice(key, name, {}, gn_groups=gn_groups)
