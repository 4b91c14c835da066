"""From the config's names (CONV_BODY, TRANS_FUNC, STEM_FUNC, head extractors) to norm layers.

The published names carry the norm as a suffix: ``R-50-FPN-MABN`` with ``BottleneckWithMABN``
and ``StemWithMABN``, ``FPNXconv1fcMABNFeatureExtractor``, ``MaskRCNNFPNMABNFeatureExtractor``.
maskrcnn-benchmark's GroupNorm models use the names without a suffix and the USE_GN keys
(``R-50-FPN`` with ``BottleneckWithGN``, ``MODEL.FPN.USE_GN``, ``ROI_BOX_HEAD.USE_GN``,
``ROI_MASK_HEAD.USE_GN``). Each part is parsed once here into a :class:`NormSpec`: the factory
name for :func:`mabn.get_norm`, the constructor options from ``MODEL.MABN`` / ``MODEL.BRN``
bound with ``functools.partial`` (GroupNorm: :class:`GroupNormLayer` from ``MODEL.GROUP_NORM``),
and whether the convs before it are weight-centralized (MABN). Modules receive only the resulting
``norm_layer(num_channels)`` callable.
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from torch import nn
from yacs.config import CfgNode

import mabn
from det.config.support import FPN_BODY
from mabn.utils.errors import UserError

__all__ = ["GroupNormLayer", "NormSpec", "body_spec", "box_head_spec", "fpn_spec", "group_norm_layer", "mask_head_spec",
           "norm_spec"]

# Suffix as written in the published names -> mabn.get_norm name.
_SUFFIXES: Dict[str, str] = {
    "MABN": "MABN", "SYNCBN": "SyncBN", "BN": "BN", "BRN": "BRN", "GN": "GN",
    "FIXEDBATCHNORM": "FrozenBN", "FROZENBN": "FrozenBN",
}
BODY_DEPTHS = (18, 34, 50, 101, 152)
DEFAULT_GN_GROUPS = 32
"""The default of MODEL.GROUP_NORM.NUM_GROUPS and MODEL.GN.NUM_GROUPS."""


@dataclass(frozen=True)
class NormSpec:
    """A norm by factory name, its layer factory (None: no norm) and whether convs feeding it are
    weight-centralized (``mabn.CenConv2d``: MABN normalizes the second moment only)."""

    name: str
    layer: Optional[Callable[[int], nn.Module]]
    centralize_convs: bool


class GroupNormLayer:
    """``GroupNorm`` factory with maskrcnn-benchmark's group rule (``get_group_gn``): ``num_groups``
    groups, or ``channels / dim_per_group`` groups when ``dim_per_group`` is positive; ``eps`` as
    given. ``source`` names the key that set the rule, for the error when it does not divide."""

    def __init__(self, dim_per_group: int, num_groups: int, eps: float, source: str) -> None:
        self.dim_per_group = dim_per_group
        self.num_groups = num_groups
        self.eps = eps
        self.source = source

    def groups(self, channels: int) -> int:
        """The group count of a layer with ``channels`` channels."""
        per_group = self.dim_per_group > 0
        divisor = self.dim_per_group if per_group else self.num_groups
        if channels % divisor:
            raise UserError(f"{self.source} {divisor} does not divide the {channels} channels of a GroupNorm layer; "
                            f"use a divisor of every normalized width (e.g. {'16' if per_group else '32 or 16'})")
        return channels // divisor if per_group else divisor

    def __call__(self, channels: int) -> nn.Module:
        return mabn.get_norm("GN", channels, num_groups=self.groups(channels), eps=self.eps)

    def __repr__(self) -> str:
        return f"GroupNormLayer(dim_per_group={self.dim_per_group}, num_groups={self.num_groups}, eps={self.eps})"


def group_norm_layer(cfg: CfgNode) -> GroupNormLayer:
    """The GroupNorm rule of ``MODEL.GROUP_NORM`` (``MODEL.GN.NUM_GROUPS``, the older name of
    ``GROUP_NORM.NUM_GROUPS``, sets the group count when it is not 32)."""
    settings = cfg.MODEL.GROUP_NORM
    dim_per_group, num_groups, source = settings.DIM_PER_GP, settings.NUM_GROUPS, "MODEL.GROUP_NORM.NUM_GROUPS"
    alias = cfg.MODEL.GN.NUM_GROUPS
    if alias != DEFAULT_GN_GROUPS:
        if num_groups not in (DEFAULT_GN_GROUPS, alias):
            raise UserError(f"MODEL.GN.NUM_GROUPS {alias} and MODEL.GROUP_NORM.NUM_GROUPS {num_groups} disagree; "
                            f"set MODEL.GROUP_NORM.NUM_GROUPS only")
        num_groups, source = alias, "MODEL.GN.NUM_GROUPS"
    if (dim_per_group == -1) == (num_groups == -1):
        raise UserError(f"MODEL.GROUP_NORM: DIM_PER_GP {dim_per_group} and NUM_GROUPS {num_groups}: exactly one "
                        f"of them must be -1 (GroupNorm takes the group count or the channels per group)")
    if max(dim_per_group, num_groups) < 1:
        raise UserError(f"MODEL.GROUP_NORM: DIM_PER_GP {dim_per_group} / NUM_GROUPS {num_groups}: the one in use "
                        f"must be positive, the other -1")
    if settings.EPSILON <= 0:
        raise UserError(f"MODEL.GROUP_NORM.EPSILON {settings.EPSILON} must be positive")
    if dim_per_group > 0:
        source = "MODEL.GROUP_NORM.DIM_PER_GP"
    return GroupNormLayer(dim_per_group, num_groups, float(settings.EPSILON), source)


def norm_spec(name: str, cfg: CfgNode) -> NormSpec:
    """The :class:`NormSpec` of factory name ``name`` ("" for none) with options from ``cfg``."""
    if name == "":
        return NormSpec("", None, False)
    if name == "GN":
        return NormSpec(name, group_norm_layer(cfg), False)
    options = {}
    if name == "MABN":
        r_warmup = cfg.MODEL.MABN.R_WARMUP_ITERS
        options = dict(B=cfg.MODEL.MABN.B, real_B=cfg.MODEL.MABN.REAL_B, warmup_iters=cfg.MODEL.MABN.WARMUP_ITERS,
                       momentum=cfg.MODEL.MABN.MOMENTUM, r_warmup_iters=None if r_warmup < 0 else r_warmup,
                       fused_statistics=cfg.MODEL.MABN.FUSED_STATISTICS)
        try:
            mabn.get_norm("MABN", 1, **options)
        except ValueError as exc:
            raise UserError(f"MODEL.MABN: {exc}") from None
    elif name == "BRN":
        options = dict(warmup_steps=cfg.MODEL.BRN.WARMUP_ITERS, r_ramp_end=cfg.MODEL.BRN.R_RAMP_END,
                       d_ramp_end=cfg.MODEL.BRN.D_RAMP_END, r_max=cfg.MODEL.BRN.R_MAX, d_max=cfg.MODEL.BRN.D_MAX)
        try:
            mabn.get_norm("BRN", 1, **options)
        except ValueError as exc:
            raise UserError(f"MODEL.BRN: {exc}") from None
    return NormSpec(name, functools.partial(mabn.get_norm, name, **options), name == "MABN")


def _suffix_norm(suffix: str, key: str, value: str) -> str:
    norm = _SUFFIXES.get(suffix.upper())
    if norm is None:
        raise UserError(f"{key} {value!r}: unknown norm {suffix!r}; valid: "
                        f"{', '.join(sorted(set(s for s in _SUFFIXES if s != 'FROZENBN')))}")
    return norm


def _parse(pattern: str, key: str, value: str, examples: Tuple[str, ...]) -> re.Match:
    match = re.fullmatch(pattern, value)
    if match is None:
        close = difflib.get_close_matches(value, examples, n=1, cutoff=0.0)
        raise UserError(f"{key} {value!r} is not supported; did you mean {close[0]!r}? "
                        f"(forms: {', '.join(examples)})")
    return match


def _conv_body(cfg: CfgNode) -> Tuple[int, Optional[str]]:
    """Depth and the norm of the suffix (None without one) of MODEL.BACKBONE.CONV_BODY."""
    body = cfg.MODEL.BACKBONE.CONV_BODY
    examples = ("R-50-FPN", "R-50-FPN-MABN", "R-50-FPN-SYNCBN", "R-50-FPN-BN", "R-50-FPN-BRN", "R-50-FPN-GN",
                "R-18-FPN-MABN", "R-101-FPN", "R-152-FPN-MABN")
    match = _parse(FPN_BODY.pattern, "MODEL.BACKBONE.CONV_BODY", body, examples)
    depth = int(match.group(1))
    if depth not in BODY_DEPTHS:
        raise UserError(f"MODEL.BACKBONE.CONV_BODY {body!r}: ResNet depth {depth} is not available; "
                        f"choose from {', '.join(map(str, BODY_DEPTHS))}")
    suffix = match.group(2)
    return depth, _suffix_norm(suffix, "MODEL.BACKBONE.CONV_BODY", body) if suffix else None


def body_spec(cfg: CfgNode) -> Tuple[int, NormSpec]:
    """ResNet depth and body norm. The norm is the one TRANS_FUNC and STEM_FUNC name (as in
    maskrcnn-benchmark, where they pick the body's modules); a CONV_BODY suffix must name it too."""
    body = cfg.MODEL.BACKBONE.CONV_BODY
    depth, suffix_norm = _conv_body(cfg)
    block = cfg.MODEL.RESNETS.TRANS_FUNC
    stem = cfg.MODEL.RESNETS.STEM_FUNC
    block_match = _parse(r"(Bottleneck|BasicBlock)With(\w+)", "MODEL.RESNETS.TRANS_FUNC", block,
                         ("BottleneckWithMABN", "BasicBlockWithMABN", "BottleneckWithGN",
                          "BottleneckWithFixedBatchNorm"))
    block_type = "Bottleneck" if depth >= 50 else "BasicBlock"
    if block_match.group(1) != block_type:
        raise UserError(f"MODEL.RESNETS.TRANS_FUNC {block!r} does not fit {body!r}, whose blocks are "
                        f"{block_type}s; use {block_type}With{block_match.group(2)!s}")
    block_norm = _suffix_norm(block_match.group(2), "MODEL.RESNETS.TRANS_FUNC", block)
    stem_norm = _suffix_norm(_parse(r"StemWith(\w+)", "MODEL.RESNETS.STEM_FUNC", stem, ("StemWithMABN",)).group(1),
                             "MODEL.RESNETS.STEM_FUNC", stem)
    if block_norm != stem_norm or suffix_norm not in (None, block_norm):
        means = f"CONV_BODY {body!r} means {suffix_norm}, " if suffix_norm else ""
        raise UserError(f"the body's norms disagree: {means}TRANS_FUNC {block!r} {block_norm}, STEM_FUNC {stem!r} "
                        f"{stem_norm}; name the same norm in all of them")
    return depth, norm_spec(block_norm, cfg)


def _gn_or(norm: str, use_gn: bool, gn_key: str, named: str, cfg: CfgNode) -> NormSpec:
    """``norm`` (from a name's suffix, "" without one), or GN when ``use_gn``; a suffix other than
    GN together with ``use_gn`` is refused."""
    if use_gn and norm not in ("", "GN"):
        raise UserError(f"{gn_key} True asks for GroupNorm, but {named} names {norm}; set {gn_key} False or "
                        f"use the name without a norm")
    return norm_spec("GN" if use_gn else norm, cfg)


def fpn_spec(cfg: CfgNode) -> NormSpec:
    """The FPN's norm: the CONV_BODY suffix (none for FrozenBN), else GN with MODEL.FPN.USE_GN, else
    none (convs with bias), as maskrcnn-benchmark's ``R-*-FPN``, ``-SYNCBN`` and ``-MABN`` backbones."""
    _, suffix_norm = _conv_body(cfg)
    norm = "" if suffix_norm in (None, "FrozenBN") else suffix_norm
    return _gn_or(norm, cfg.MODEL.FPN.USE_GN, "MODEL.FPN.USE_GN",
                  f"MODEL.BACKBONE.CONV_BODY {cfg.MODEL.BACKBONE.CONV_BODY!r}", cfg)


def _head_spec(key: str, value: str, pattern: str, plain: str, examples: Tuple[str, ...], use_gn: bool,
               gn_key: str, cfg: CfgNode) -> NormSpec:
    if value == plain:
        return _gn_or("", use_gn, gn_key, f"{key} {value!r}", cfg)
    norm = _suffix_norm(_parse(pattern, key, value, examples).group(1), key, value)
    if norm == "FrozenBN":
        raise UserError(f"{key} {value!r}: FrozenBN in a randomly initialized head does not normalize; "
                        f"use a trainable norm or {plain!r}")
    return _gn_or(norm, use_gn, gn_key, f"{key} {value!r}", cfg)


def box_head_spec(cfg: CfgNode) -> Tuple[bool, NormSpec]:
    """(True for the conv head ``FPNXconv1fc*``, False for ``FPN2MLPFeatureExtractor``; its norm:
    the name's suffix, else GN with ROI_BOX_HEAD.USE_GN, else none)."""
    value = cfg.MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR
    if value == "FPN2MLPFeatureExtractor":
        return False, _gn_or("", cfg.MODEL.ROI_BOX_HEAD.USE_GN, "MODEL.ROI_BOX_HEAD.USE_GN", repr(value), cfg)
    return True, _head_spec("MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", value, r"FPNXconv1fc(\w+)FeatureExtractor",
                            "FPNXconv1fcFeatureExtractor",
                            ("FPN2MLPFeatureExtractor", "FPNXconv1fcFeatureExtractor",
                             "FPNXconv1fcMABNFeatureExtractor"),
                            cfg.MODEL.ROI_BOX_HEAD.USE_GN, "MODEL.ROI_BOX_HEAD.USE_GN", cfg)


def mask_head_spec(cfg: CfgNode) -> NormSpec:
    """The norm of the mask head's convs (``MaskRCNNFPN[<NORM>]FeatureExtractor``; GN with
    ROI_MASK_HEAD.USE_GN for the name without a norm)."""
    return _head_spec("MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR", cfg.MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR,
                      r"MaskRCNNFPN(\w+)FeatureExtractor", "MaskRCNNFPNFeatureExtractor",
                      ("MaskRCNNFPNFeatureExtractor", "MaskRCNNFPNMABNFeatureExtractor"),
                      cfg.MODEL.ROI_MASK_HEAD.USE_GN, "MODEL.ROI_MASK_HEAD.USE_GN", cfg)
