"""Swap the normalization layers or convolutions of an existing model.

``convert_norm(model, "MABN")`` turns a torchvision (or any) network's BatchNorm layers into
another norm, and ``convert_conv(model, "CenConv")`` turns its convolutions into weight-
centralized ones. Both return the converted module, like
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, keep parameters (the same ``Parameter``
objects where shapes allow, so optimizers and ``requires_grad`` carry over), the training flag
and the device/dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.cen_conv import CONV_TYPES, CenConv1d, CenConv2d, CenConv3d, centralize_weight, plain_conv_class
from mabn.factory import NORM_CLASSES_BY_DIM, NormSpec, get_norm, resolve_norm_name
from mabn.moving_average_bn import _MovingAverageBatchNorm

__all__ = ["convert_conv", "convert_norm", "convert_sync_batchnorm", "is_batch_norm", "revert_sync_batchnorm"]

_SPATIAL_DIM = {cls: dim for table in NORM_CLASSES_BY_DIM.values() for dim, cls in table.items()}

SourceSpec = Union[Type[nn.Module], Tuple[Type[nn.Module], ...], Callable[[nn.Module], bool]]


def is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm of any flavour: torch's (and subclasses: SyncBN, BRN, MABN) or FrozenBN."""
    return isinstance(module, (_BatchNorm, FrozenBatchNorm2d))


def _replace(module: nn.Module, match: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    if match(module):
        return build(module)
    for name, child in module.named_children():
        new_child = _replace(child, match, build)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _second_moment(norm: nn.Module) -> torch.Tensor:
    """E[x^2] per channel implied by a BN-like layer's statistics (MABN stores it directly)."""
    if isinstance(norm, _MovingAverageBatchNorm):
        return norm.running_var
    return norm.running_var + norm.running_mean.square()


def _spatial_dim(norm: nn.Module) -> int:
    """1, 2 or 3 for BatchNorm{1,2,3}d-style layers (their subclasses included); 2 otherwise."""
    return next((_SPATIAL_DIM[cls] for cls in type(norm).__mro__ if cls in _SPATIAL_DIM), 2)


def convert_norm(module: nn.Module, norm: NormSpec, *, source: SourceSpec = is_batch_norm, **kwargs) -> nn.Module:
    """Replace every BatchNorm (torch's and its subclasses, and FrozenBN) by ``norm``.

    ``source`` narrows which layers are replaced: a class, a tuple of classes or a predicate.
    Affine parameters are carried over. Statistics are carried where they mean something: to a
    BN-like target the running mean and variance; to MABN the second moment
    ``running_var + running_mean ** 2`` (MABN normalizes by E[x^2]); from MABN to a BN-like
    target mean 0 and variance E[x^2], so eval outputs are unchanged. Between BN and SyncBN the
    momentum and ``num_batches_tracked`` carry over too (same convention); MABN and BRN start
    their own schedules. GN, IN and LN keep the
    affine parameters only. The new layer takes over the old ``weight`` and ``bias`` Parameter
    objects (optimizer state and ``requires_grad`` carry over). ``kwargs`` go to the new
    layers' constructor (``eps`` defaults to the old layer's, ``dim`` to the old layer's
    1d/2d/3d). ``affine=False`` and ``bias=False`` carry over to BN-like targets.
    """
    target_name = resolve_norm_name(norm) if isinstance(norm, str) or norm is None else None
    match = source if not isinstance(source, (type, tuple)) else (lambda m: isinstance(m, source))

    def build(old: nn.Module) -> nn.Module:
        if target_name == "":
            return nn.Identity()
        options = dict(kwargs)
        if target_name is not None:
            options.setdefault("eps", old.eps)
        if target_name in ("BN", "BRN", "MABN", "IN"):
            options.setdefault("dim", _spatial_dim(old))
        carries_counters = target_name in ("BN", "SyncBN") and not isinstance(old, _MovingAverageBatchNorm)
        if carries_counters and isinstance(old, _BatchNorm):
            options.setdefault("momentum", old.momentum)
        if target_name in ("BN", "SyncBN", "BRN", "IN") and old.weight is None:
            options.setdefault("affine", False)
        if target_name in ("BN", "SyncBN") and old.weight is not None and old.bias is None:
            options.setdefault("bias", False)
        num_features = getattr(old, "num_features", None) or old.weight.shape[0]
        new = get_norm(norm, num_features, **options)
        reference = old.weight if old.weight is not None else old.running_mean
        new = new.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            if isinstance(old.weight, nn.Parameter) and isinstance(getattr(new, "weight", None), nn.Parameter):
                new.weight, new.bias = old.weight, old.bias
            elif old.weight is not None and getattr(new, "weight", None) is not None:
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            if getattr(new, "running_var", None) is not None and getattr(old, "running_var", None) is not None:
                if isinstance(new, _MovingAverageBatchNorm):
                    new.running_var.copy_(_second_moment(old))
                else:
                    new.running_mean.copy_(old.running_mean)
                    new.running_var.copy_(old.running_var)
            if carries_counters and getattr(old, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(old.num_batches_tracked)
        new.train(old.training)
        return new

    return _replace(module, match, build)


def _is_plain_batch_norm(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace torch's ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` layers by :class:`mabn.SyncBatchNorm`.

    Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, BN subclasses with other semantics
    (MABN, Batch Renorm, ghost BN) are left alone. Parameters are shared and statistics copied
    (see :func:`convert_norm`).
    """
    return convert_norm(module, "SyncBN", source=_is_plain_batch_norm, process_group=process_group)


def revert_sync_batchnorm(module: nn.Module, dim: int = 2) -> nn.Module:
    """Turn every ``torch.nn.SyncBatchNorm`` (ours included) back into ``BatchNorm{dim}d``.

    A SyncBatchNorm accepts any (N, C, ...) input, so the target dimensionality is an argument
    (pytorch#41081 asks for this reverse conversion). Parameters are shared, statistics copied.
    """
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (target BatchNorm{{dim}}d), got {dim!r}")
    return convert_norm(module, "BN", source=nn.SyncBatchNorm, dim=dim)


_CONV_TARGETS = {
    "cenconv": {nn.Conv1d: CenConv1d, nn.Conv2d: CenConv2d, nn.Conv3d: CenConv3d},
    "conv": {cls: cls for cls in CONV_TYPES},
}


def convert_conv(module: nn.Module, conv: str = "CenConv") -> nn.Module:
    """Turn every ``nn.Conv{1,2,3}d`` into ``CenConv{1,2,3}d`` (``conv="CenConv"``) or back
    (``conv="Conv"``: a plain conv holding the centralized weight, same outputs).

    The weights are copied unchanged into CenConv, so outputs change by the filter means (that
    is the point: a model trained with CenConv needs CenConv). Returns the converted module.
    """
    key = conv.lower()
    if key not in _CONV_TARGETS:
        raise ValueError(f"unknown conv {conv!r}; valid: 'CenConv' (weight-centralized) or 'Conv' (plain)")
    to_plain = key == "conv"
    cen_types = (CenConv1d, CenConv2d, CenConv3d)

    def match(m: nn.Module) -> bool:
        if not isinstance(m, CONV_TYPES):
            return False
        return isinstance(m, cen_types) if to_plain else not isinstance(m, cen_types)

    def build(old: nn.Module) -> nn.Module:
        new = _CONV_TARGETS[key][plain_conv_class(old)](
            old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
            old.groups, old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(centralize_weight(old.weight) if to_plain else old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        new.train(old.training)
        return new

    return _replace(module, match, build)
