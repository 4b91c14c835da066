"""From the config's names (CONV_BODY, TRANS_FUNC, STEM_FUNC, head extractors) to norm layers.

The published names carry the norm as a suffix: ``R-50-FPN-MABN`` with ``BottleneckWithMABN``
and ``StemWithMABN``, ``FPNXconv1fcMABNFeatureExtractor``, ``MaskRCNNFPNMABNFeatureExtractor``.
Each is parsed once here into a :class:`NormSpec`: the factory name for :func:`mabn.get_norm`,
the constructor options from ``MODEL.MABN`` / ``MODEL.BRN`` / ``MODEL.GN`` bound with
``functools.partial``, and whether the convs before it are weight-centralized (MABN). Modules
receive only the resulting ``norm_layer(num_channels)`` callable.
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
from mabn.utils.errors import UserError

__all__ = ["NormSpec", "body_spec", "box_head_spec", "mask_head_spec", "norm_spec"]

# Suffix as written in the published names -> mabn.get_norm name.
_SUFFIXES: Dict[str, str] = {
    "MABN": "MABN", "SYNCBN": "SyncBN", "BN": "BN", "BRN": "BRN", "GN": "GN",
    "FIXEDBATCHNORM": "FrozenBN", "FROZENBN": "FrozenBN",
}
BODY_DEPTHS = (18, 34, 50, 101, 152)


@dataclass(frozen=True)
class NormSpec:
    """A norm by factory name, its layer factory (None: no norm) and whether convs feeding it are
    weight-centralized (``mabn.CenConv2d``: MABN normalizes the second moment only)."""

    name: str
    layer: Optional[Callable[[int], nn.Module]]
    centralize_convs: bool


def norm_spec(name: str, cfg: CfgNode) -> NormSpec:
    """The :class:`NormSpec` of factory name ``name`` ("" for none) with options from ``cfg``."""
    if name == "":
        return NormSpec("", None, False)
    options = {}
    if name == "MABN":
        r_warmup = cfg.MODEL.MABN.R_WARMUP_ITERS
        options = dict(B=cfg.MODEL.MABN.B, real_B=cfg.MODEL.MABN.REAL_B, warmup_iters=cfg.MODEL.MABN.WARMUP_ITERS,
                       momentum=cfg.MODEL.MABN.MOMENTUM, r_warmup_iters=None if r_warmup < 0 else r_warmup)
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
    elif name == "GN":
        groups = cfg.MODEL.GN.NUM_GROUPS
        widths = {64, cfg.MODEL.RESNETS.BACKBONE_OUT_CHANNELS, cfg.MODEL.ROI_BOX_HEAD.CONV_HEAD_DIM,
                  *cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS}  # ResNet widths are multiples of 64
        bad = sorted(width for width in widths if groups < 1 or width % groups)
        if bad:
            raise UserError(f"MODEL.GN.NUM_GROUPS {groups} does not divide the channel counts {bad}; "
                            f"use a common divisor such as 32 or 16")
        options = dict(num_groups=groups)
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


def body_spec(cfg: CfgNode) -> Tuple[int, NormSpec]:
    """ResNet depth and body norm from CONV_BODY, checked against TRANS_FUNC and STEM_FUNC."""
    body = cfg.MODEL.BACKBONE.CONV_BODY
    examples = ("R-50-FPN", "R-50-FPN-MABN", "R-50-FPN-SYNCBN", "R-50-FPN-BN", "R-50-FPN-BRN", "R-50-FPN-GN",
                "R-18-FPN-MABN", "R-101-FPN-MABN", "R-152-FPN-MABN")
    match = _parse(r"R-(\d+)-FPN(?:-([A-Za-z]+))?", "MODEL.BACKBONE.CONV_BODY", body, examples)
    depth = int(match.group(1))
    if depth not in BODY_DEPTHS:
        raise UserError(f"MODEL.BACKBONE.CONV_BODY {body!r}: ResNet depth {depth} is not available; "
                        f"choose from {', '.join(map(str, BODY_DEPTHS))}")
    norm = _suffix_norm(match.group(2), "MODEL.BACKBONE.CONV_BODY", body) if match.group(2) else "FrozenBN"
    block = cfg.MODEL.RESNETS.TRANS_FUNC
    stem = cfg.MODEL.RESNETS.STEM_FUNC
    block_match = _parse(r"(Bottleneck|BasicBlock)With(\w+)", "MODEL.RESNETS.TRANS_FUNC", block,
                         ("BottleneckWithMABN", "BasicBlockWithMABN"))
    block_type = "Bottleneck" if depth >= 50 else "BasicBlock"
    if block_match.group(1) != block_type:
        raise UserError(f"MODEL.RESNETS.TRANS_FUNC {block!r} does not fit {body!r}, whose blocks are "
                        f"{block_type}s; use {block_type}With{block_match.group(2)!s}")
    block_norm = _suffix_norm(block_match.group(2), "MODEL.RESNETS.TRANS_FUNC", block)
    stem_norm = _suffix_norm(_parse(r"StemWith(\w+)", "MODEL.RESNETS.STEM_FUNC", stem, ("StemWithMABN",)).group(1),
                             "MODEL.RESNETS.STEM_FUNC", stem)
    if not norm == block_norm == stem_norm:
        raise UserError(f"the body's norms disagree: CONV_BODY {body!r} means {norm}, TRANS_FUNC {block!r} "
                        f"{block_norm}, STEM_FUNC {stem!r} {stem_norm}; name the same norm in all three")
    return depth, norm_spec(norm, cfg)


def _head_spec(key: str, value: str, pattern: str, plain: str, examples: Tuple[str, ...],
               cfg: CfgNode) -> NormSpec:
    if value == plain:
        return norm_spec("", cfg)
    norm = _suffix_norm(_parse(pattern, key, value, examples).group(1), key, value)
    if norm == "FrozenBN":
        raise UserError(f"{key} {value!r}: FrozenBN in a randomly initialized head does not normalize; "
                        f"use a trainable norm or {plain!r}")
    return norm_spec(norm, cfg)


def box_head_spec(cfg: CfgNode) -> Tuple[bool, NormSpec]:
    """(True for the conv head ``FPNXconv1fc*``, False for ``FPN2MLPFeatureExtractor``; its norm)."""
    value = cfg.MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR
    if value == "FPN2MLPFeatureExtractor":
        return False, norm_spec("", cfg)
    return True, _head_spec("MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR", value, r"FPNXconv1fc(\w+)FeatureExtractor",
                            "FPNXconv1fcFeatureExtractor",
                            ("FPN2MLPFeatureExtractor", "FPNXconv1fcFeatureExtractor", "FPNXconv1fcMABNFeatureExtractor"),
                            cfg)


def mask_head_spec(cfg: CfgNode) -> NormSpec:
    """The norm of the mask head's convs (``MaskRCNNFPN[<NORM>]FeatureExtractor``)."""
    return _head_spec("MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR", cfg.MODEL.ROI_MASK_HEAD.FEATURE_EXTRACTOR,
                      r"MaskRCNNFPN(\w+)FeatureExtractor", "MaskRCNNFPNFeatureExtractor",
                      ("MaskRCNNFPNFeatureExtractor", "MaskRCNNFPNMABNFeatureExtractor"), cfg)
