"""Swap the normalization layers or convolutions of an existing model.

``convert_norm(model, "MABN")`` turns a torchvision (or any) network's BatchNorm layers into
another norm, and ``convert_conv(model, "CenConv")`` turns its convolutions into weight-
centralized ones. Both return the converted module, like
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, keep parameters (the same ``Parameter``
objects where shapes allow, so optimizers and ``requires_grad`` carry over), the training flag
and the device/dtype.

A converted network computes what it did before (up to the new layer's own normalization): a
source layer is replaced only when the new layer can take over everything it does. A plain
BN-like layer (its class keeps the ``forward`` of a norm this package knows, it holds no child
modules and no hooks) becomes the new norm. A norm-activation layer that normalizes and then
applies child modules ``drop`` and ``act`` (timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``,
verified on a probe input in eval mode) becomes :class:`NormAct` ``(new_norm, drop, act)``
holding the same ``drop`` and ``act`` modules. Any other layer is refused with an error naming
it; nothing is silently simplified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.cen_conv import CONV_TYPES, CenConv1d, CenConv2d, CenConv3d, centralize_weight, plain_conv_class
from mabn.factory import GHOST_BN_BY_DIM, NORM_CLASSES_BY_DIM, NormSpec, get_norm, resolve_norm_name
from mabn.moving_average_bn import _MovingAverageBatchNorm
from mabn.sync_batchnorm import SyncBatchNorm

__all__ = ["NormAct", "NotConvertibleError", "convert_conv", "convert_norm", "convert_sync_batchnorm", "is_batch_norm",
           "is_mabn", "mabn_running_var", "revert_sync_batchnorm", "skipped_updates"]

_SPATIAL_DIM = {cls: dim for table in NORM_CLASSES_BY_DIM.values() for dim, cls in table.items()}

_BN_LIKE_CLASSES = (
    [cls for name in ("BN", "BRN", "MABN") for cls in NORM_CLASSES_BY_DIM[name].values()]
    + list(GHOST_BN_BY_DIM.values()) + [nn.SyncBatchNorm, SyncBatchNorm, FrozenBatchNorm2d])
# A layer whose class keeps one of these forwards normalizes and does nothing else.
_NORM_FORWARDS = frozenset(cls.forward for cls in _BN_LIKE_CLASSES)
# BN subclasses of this package: other training statistics than BatchNorm's, or already ours.
_PACKAGE_BN_SUBCLASSES = (
    tuple(NORM_CLASSES_BY_DIM["BRN"].values()) + tuple(NORM_CLASSES_BY_DIM["MABN"].values())
    + tuple(GHOST_BN_BY_DIM.values()) + (SyncBatchNorm,))
# Children that timm's norm-activation layers apply after normalizing, in this order.
_NORM_ACT_CHILDREN = ("drop", "act")

SourceSpec = Union[Type[nn.Module], Tuple[Type[nn.Module], ...], Callable[[nn.Module], bool]]


def is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm of any flavour: torch's (and subclasses: SyncBN, BRN, MABN) or FrozenBN."""
    return isinstance(module, (_BatchNorm, FrozenBatchNorm2d))


def skipped_updates(model: nn.Module) -> torch.Tensor:
    """Forwards whose running-statistics update was skipped for non-finite statistics, summed over
    every ``skipped_updates`` buffer of ``model`` (0-dim long tensor; no host sync)."""
    counters = [b for name, b in model.named_buffers() if name.rpartition(".")[2] == "skipped_updates"]
    if not counters:
        return torch.zeros((), dtype=torch.long)
    total = counters[0].clone()
    for counter in counters[1:]:
        total += counter.to(total.device, non_blocking=True)
    return total


class NormAct(nn.Module):
    """A norm followed by the ``drop`` and ``act`` modules of the norm-activation layer it replaced.

    :func:`convert_norm` puts it where timm's ``BatchNormAct2d`` was, so that the activation is
    kept; the children ``norm``, ``drop`` and ``act`` name the state-dict keys
    (``bn1.norm.weight``, ``bn1.act.*``). :func:`mabn.fold_norms` folds ``norm`` into the conv
    before it and keeps ``drop`` and ``act``.
    """

    def __init__(self, norm: nn.Module, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class NotConvertibleError(ValueError):
    """A BN-like layer does more than normalize, in a way no new norm layer can take over."""


def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has its own forward, forward-pre or backward hooks (with or without
    kwargs): hooks that a layer replacing or absorbing it would not run."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks
                or getattr(module, "_forward_hooks_with_kwargs", None)
                or getattr(module, "_forward_pre_hooks_with_kwargs", None))


def _modules_after_norm(layer: nn.Module) -> Dict[str, nn.Module]:
    """What a BN-like ``layer`` applies after normalizing: ``{}`` for a plain norm, its ``drop``
    and ``act`` children for a norm-activation layer. Raises :class:`NotConvertibleError`
    saying why for anything else."""
    if has_module_hooks(layer):
        raise NotConvertibleError("it has hooks, which a new layer would not run")
    children = dict(layer.named_children())
    if not children:
        if type(layer).forward not in _NORM_FORWARDS:
            raise NotConvertibleError("its class defines its own forward, which a new layer would not run")
        return {}
    if not set(children) <= set(_NORM_ACT_CHILDREN):
        raise NotConvertibleError(f"it holds child modules ({', '.join(children)}) that a new layer would not "
                                  f"run (only 'drop' and 'act', applied in this order after normalizing, are kept)")
    after = {name: children[name] for name in _NORM_ACT_CHILDREN if name in children}
    if not _normalizes_then_applies(layer, list(after.values())):
        raise NotConvertibleError(f"its forward is not normalization followed by {' then '.join(after)} "
                                  f"(checked on a probe input in eval mode)")
    return after


@torch.no_grad()
def _normalizes_then_applies(layer: nn.Module, after: list) -> bool:
    """Whether ``layer(x) == after(batch_norm(x))`` in eval mode on a fixed probe input."""
    reference = layer.running_mean if layer.running_mean is not None else layer.weight
    if reference is None or reference.device.type == "meta":
        return True  # nothing to compute with: the children's names are all there is to go by
    shape = (2, reference.numel()) + (3,) * _spatial_dim(layer)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(reference)
    modes = {m: m.training for m in layer.modules()}
    layer.eval()
    try:
        y = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                         layer.running_mean is None, 0.0, layer.eps)
        for module in after:
            y = module(y)
        return torch.allclose(layer(x.clone()), y, rtol=1e-4, atol=1e-5, equal_nan=True)
    except Exception:  # a forward that cannot run on a plain (N, C, ...) input is no norm-act layer
        return False
    finally:
        for module, training in modes.items():
            module.training = training


def _replace(module: nn.Module, match: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    if match(module):
        return build(module)
    for name, child in module.named_children():
        new_child = _replace(child, match, build)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _modules_after_each_norm(module: nn.Module, match: Callable[[nn.Module], bool]) -> Dict[int, Dict[str, nn.Module]]:
    """:func:`_modules_after_norm` of every layer ``match`` selects, by ``id``; raises, naming the
    first layer that cannot be replaced, before anything is changed."""
    after = {}
    for path, layer in module.named_modules():
        if not match(layer):
            continue
        try:
            after[id(layer)] = _modules_after_norm(layer)
        except NotConvertibleError as exc:
            cls = type(layer)
            raise NotConvertibleError(
                f"cannot replace {path or 'the root module'} ({cls.__module__}.{cls.__qualname__}): {exc}; "
                f"convert it by hand, or leave it out with convert_norm(..., source=...)") from None
    return after


def is_mabn(module: nn.Module) -> bool:
    """Whether ``module`` is a MABN layer (``MABN1d``, ``MABN2d``, ``MABN3d`` or a subclass)."""
    return isinstance(module, _MovingAverageBatchNorm)


def mabn_running_var(running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """The MABN ``running_var`` that BN statistics imply: the second moment ``E[x^2] = var +
    mean^2`` per channel, as a (C,) tensor (published (1, C, 1, 1) shapes are flattened). MABN
    keeps ``running_mean`` at zero and normalizes by this value."""
    return running_var.reshape(-1) + running_mean.reshape(-1).square()


def _second_moment(norm: nn.Module) -> torch.Tensor:
    """E[x^2] per channel implied by a BN-like layer's statistics (MABN stores it directly)."""
    if is_mabn(norm):
        return norm.running_var
    return mabn_running_var(norm.running_mean, norm.running_var)


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

    A norm-activation source layer (timm's ``BatchNormAct2d``) becomes ``NormAct(new_norm,
    drop, act)`` with its own ``drop`` and ``act`` modules. A source layer that does anything
    else besides normalizing (its own ``forward``, other child modules, forward hooks) raises
    :class:`NotConvertibleError` naming it, before the model is changed.
    """
    target_name = resolve_norm_name(norm) if isinstance(norm, str) or norm is None else None
    match = source if not isinstance(source, (type, tuple)) else (lambda m: isinstance(m, source))
    modules_after = _modules_after_each_norm(module, match)

    def build(old: nn.Module) -> nn.Module:
        new = build_norm(old)
        after = modules_after[id(old)]
        if not after:
            return new
        wrapper = NormAct(new, **after)
        wrapper.training = old.training  # its children keep their own flags
        return wrapper

    def build_norm(old: nn.Module) -> nn.Module:
        if target_name == "":
            return nn.Identity()
        rules = _TARGET_RULES.get(target_name, _TargetRules())
        num_features = getattr(old, "num_features", None) or old.weight.shape[0]
        new = get_norm(norm, num_features, **_constructor_options(old, target_name, rules, kwargs))
        reference = old.weight if old.weight is not None else old.running_mean
        new = new.to(device=reference.device, dtype=reference.dtype)
        _carry_state(old, new, rules.carries_counters and not is_mabn(old))
        new.train(old.training)
        return new

    return _replace(module, match, build)


@dataclass(frozen=True)
class _TargetRules:
    """What a conversion target takes over from the layer it replaces, besides eps and the affine
    parameters: its 1d/2d/3d ``dim``, ``momentum`` and ``num_batches_tracked`` (BN's conventions),
    ``affine=False``, ``bias=False``."""

    dim: bool = False
    carries_counters: bool = False
    affine_flag: bool = False
    bias_flag: bool = False


_TARGET_RULES: Dict[str, _TargetRules] = {
    "BN": _TargetRules(dim=True, carries_counters=True, affine_flag=True, bias_flag=True),
    "SyncBN": _TargetRules(carries_counters=True, affine_flag=True, bias_flag=True),
    "BRN": _TargetRules(dim=True, affine_flag=True),
    "MABN": _TargetRules(dim=True),
    "IN": _TargetRules(dim=True, affine_flag=True),
}


def _constructor_options(old: nn.Module, target_name: Optional[str], rules: _TargetRules,
                         kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The new layer's keyword arguments: the caller's, then what ``rules`` take from ``old``."""
    options = dict(kwargs)
    if target_name is not None:
        options.setdefault("eps", old.eps)
    if rules.dim:
        options.setdefault("dim", _spatial_dim(old))
    if rules.carries_counters and not is_mabn(old) and isinstance(old, _BatchNorm):
        options.setdefault("momentum", old.momentum)
    if rules.affine_flag and old.weight is None:
        options.setdefault("affine", False)
    if rules.bias_flag and old.weight is not None and old.bias is None:
        options.setdefault("bias", False)
    return options


@torch.no_grad()
def _carry_state(old: nn.Module, new: nn.Module, carries_counters: bool) -> None:
    """The affine Parameters (the same objects where both are Parameters) and the statistics
    (the second moment into MABN), and ``num_batches_tracked`` when ``carries_counters``."""
    if isinstance(old.weight, nn.Parameter) and isinstance(getattr(new, "weight", None), nn.Parameter):
        new.weight, new.bias = old.weight, old.bias
    elif old.weight is not None and getattr(new, "weight", None) is not None:
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    if getattr(new, "running_var", None) is not None and getattr(old, "running_var", None) is not None:
        if is_mabn(new):
            new.running_var.copy_(_second_moment(old))
        else:
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
    if carries_counters and getattr(old, "num_batches_tracked", None) is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)


def _is_torch_batch_norm(module: nn.Module) -> bool:
    """torch's BatchNorm{1,2,3}d / SyncBatchNorm or a subclass from outside this package."""
    return (isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
            and not isinstance(module, _PACKAGE_BN_SUBCLASSES))


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace torch's ``BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` layers by :class:`mabn.SyncBatchNorm`.

    Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, this package's BN subclasses with
    other semantics (MABN, Batch Renorm, ghost BN) are left alone, norm-activation layers keep
    their activation (:class:`NormAct`) and other BN subclasses that do more than normalize are
    refused (see :func:`convert_norm`). Parameters are shared and statistics copied.
    """
    return convert_norm(module, "SyncBN", source=_is_torch_batch_norm, process_group=process_group)


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
