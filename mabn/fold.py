"""Fold BatchNorm-like layers into the convolutions that feed them, for inference.

In eval mode every BN-like layer of this package is the per-channel affine map

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

(``torch.nn.BatchNorm{1,2,3}d``, ``SyncBatchNorm``, :class:`~mabn.BatchRenorm2d` and every other
``_BatchNorm`` subclass with running statistics, :class:`~mabn.MABN2d` whose ``running_mean`` is
zero, and torchvision's ``FrozenBatchNorm2d``; ``affine=False`` means weight 1 and bias 0).
Applied to the output of a convolution ``conv(x) = W * x + b`` it is again a convolution, with

    s  = weight / sqrt(running_var + eps)            (per output channel)
    W' = W * s                                       (each output filter scaled)
    b' = (b - running_mean) * s + bias

For weight-centralized convolutions (:class:`~mabn.CenConv2d`) ``W`` is the centralized weight.

:func:`fold_norms` finds the pairs with ``torch.fx`` (the model is traced with convolutions and
norms as leaves, and a pair is a conv call whose only user is a norm call taking nothing else),
then edits the ORIGINAL module hierarchy: the conv attribute becomes a plain ``nn.ConvNd`` with
bias, the norm attribute becomes ``nn.Identity``. The model keeps its class, its ``forward`` and
its attribute names, so code and checkpoints of the surrounding model keep working.

Norm-activation layers are folded too and keep their activation: a :class:`~mabn.NormAct`
(what :func:`mabn.convert_norm` makes of timm's ``BatchNormAct2d``) keeps its ``drop`` and
``act`` children and only its ``norm`` becomes ``nn.Identity``; an unconverted ``BatchNormAct2d``
becomes ``NormAct(nn.Identity(), drop, act)``.

Limitations: ``ConvTranspose`` layers and ``nn.Linear`` are not folded (their norms stay, still
correct in eval mode); conv subclasses with their own ``forward`` (other than CenConv), norm
subclasses with their own ``forward`` or children (other than norm-activation layers, see
:func:`mabn.convert_norm`) and modules carrying forward hooks are left alone. Without fx
(untraceable forward) only ``nn.Sequential`` neighbours are folded, and a parent ``forward``
that also calls such a child directly cannot be detected.
"""
from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torchvision.ops.misc import FrozenBatchNorm2d

from mabn.cen_conv import CONV_TYPES, _CenConvMixin, centralize_weight, plain_conv_class
from mabn.convert import NormAct, NotConvertibleError, _modules_after_norm, has_module_hooks

__all__ = ["fold_norms", "fold_conv_norm"]

_NORM_TYPES = (_BatchNorm, FrozenBatchNorm2d)


def _effective_conv_weight(conv: nn.Module) -> Optional[torch.Tensor]:
    """The weight the conv actually convolves with, or None when its forward is unknown.

    Plain ``nn.ConvNd`` (and subclasses that keep its ``forward`` and ``_conv_forward``, e.g.
    ``torch.nn.utils.parametrize``'d ones, where ``.weight`` is the parametrized weight) use
    ``weight``; CenConv uses the centralized weight. Other subclasses (QAT ``ConvBn``, weight
    standardization, ...) compute something else, so they are not folded.
    """
    base = plain_conv_class(conv)
    if type(conv)._conv_forward is not base._conv_forward:
        return None
    if type(conv).forward is _CenConvMixin.forward:
        return centralize_weight(conv.weight)
    if type(conv).forward is base.forward:
        return conv.weight
    return None


def _is_foldable_conv(module: nn.Module) -> bool:
    if not isinstance(module, CONV_TYPES) or has_module_hooks(module):
        return False
    if any(is_lazy(p) for p in module.parameters(recurse=False)):
        return False
    return _effective_conv_weight(module) is not None


def _modules_after_foldable_norm(module: nn.Module) -> Optional[Dict[str, nn.Module]]:
    """For a BN-like layer that, in eval mode, is an affine map given by its running statistics
    (then, for a norm-activation layer, its ``drop`` and ``act``): those modules after it
    (``{}`` for a plain norm). None for anything else."""
    if not isinstance(module, _NORM_TYPES) or has_module_hooks(module):
        return None
    if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None:
        return None  # track_running_stats=False: batch statistics even in eval mode
    if any(is_lazy(t) for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))):
        return None
    try:
        return _modules_after_norm(module)
    except NotConvertibleError:
        return None


def _pair_compatible(conv: nn.Module, norm: nn.Module) -> bool:
    return norm.running_mean.numel() == conv.out_channels and norm.running_var.numel() == conv.out_channels


@torch.no_grad()
def fold_conv_norm(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """One plain ``nn.Conv{1,2,3}d`` with bias equal to ``norm(conv(x))`` in eval mode.

    Same stride, padding, dilation, groups and padding mode as ``conv``; its weight dtype and
    device. The folded parameters are computed in float64, then cast.
    """
    if not _is_foldable_conv(conv):
        raise TypeError(f"cannot fold into {type(conv).__name__}: expected nn.Conv1d/2d/3d or CenConv1d/2d/3d")
    after = _modules_after_foldable_norm(norm)
    if after is None:
        raise TypeError(f"cannot fold {type(norm).__name__}: expected a BatchNorm-like layer with running statistics")
    if after:
        raise TypeError(f"{type(norm).__name__} applies {', '.join(after)} after normalizing, which one conv cannot "
                        f"hold; use fold_norms, which keeps them")
    if not _pair_compatible(conv, norm):
        raise ValueError(f"conv has {conv.out_channels} output channels but the norm has "
                         f"{norm.running_mean.numel()} features")
    return _fold(conv, norm)


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> nn.Module:
    weight = _effective_conv_weight(conv)
    dtype, device = conv.weight.dtype, conv.weight.device
    f64 = dict(dtype=torch.float64, device=device)

    w = weight.detach().to(**f64)
    b = conv.bias.detach().to(**f64) if conv.bias is not None else torch.zeros(conv.out_channels, **f64)
    mean = norm.running_mean.detach().to(**f64)
    var = norm.running_var.detach().to(**f64)
    gamma = norm.weight.detach().to(**f64) if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.detach().to(**f64) if norm.bias is not None else torch.zeros_like(mean)

    scale = gamma / torch.sqrt(var + float(norm.eps))
    fused_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    fused_b = (b - mean) * scale + beta

    fused = plain_conv_class(conv)(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=device, dtype=dtype)
    fused.weight.copy_(fused_w.to(dtype))
    fused.bias.copy_(fused_b.to(dtype))
    fused.weight.requires_grad_(conv.weight.requires_grad)
    fused.bias.requires_grad_(conv.weight.requires_grad)
    return fused.eval()


def _folded_norm_replacement(after: Dict[str, nn.Module]) -> nn.Module:
    """What stands where a folded norm was: nothing, or the modules it applied after normalizing."""
    return NormAct(nn.Identity(), **after) if after else nn.Identity()


class _ConvNormLeafTracer(torch.fx.Tracer):
    """Keeps convolutions and BN-like norms as ``call_module`` nodes, wherever they come from."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, CONV_TYPES + _NORM_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fx_pairs(model: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """(conv, norm) module pairs to fold, found on the fx graph of ``model`` (may raise)."""
    graph = _ConvNormLeafTracer().trace(model)

    calls: Dict[int, int] = defaultdict(int)
    hidden: Set[int] = set()  # modules used inside an opaque leaf, or whose tensors the graph reads
    read_tensors: Set[int] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            calls[id(module)] += 1
            if not isinstance(module, CONV_TYPES + _NORM_TYPES):
                hidden.update(id(m) for m in module.modules())
        elif node.op == "get_attr":
            try:
                read_tensors.add(id(_resolve_attr(model, node.target)))
            except AttributeError:
                pass
    # A get_attr names a shared tensor by one of its paths only: match tensors by identity.
    for module in model.modules():
        if isinstance(module, CONV_TYPES + _NORM_TYPES):
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            if any(id(t) in read_tensors for t in own):
                hidden.add(id(module))

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = model.get_submodule(node.target)
        if not _is_foldable_conv(conv) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        norm = model.get_submodule(user.target)
        if _modules_after_foldable_norm(norm) is None or not _pair_compatible(conv, norm):
            continue
        if calls[id(conv)] != 1 or calls[id(norm)] != 1 or id(conv) in hidden or id(norm) in hidden:
            continue
        pairs.append((conv, norm))
    return pairs


def _resolve_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sequential_pairs(model: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """(conv, norm) pairs that are consecutive children of an ``nn.Sequential`` (the norm may be
    the ``norm`` of a :class:`~mabn.NormAct` there)."""
    pairs = []
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for first, second in zip(children, children[1:]):
            if isinstance(second, NormAct) and not has_module_hooks(second):
                second = second.norm
            if (_is_foldable_conv(first) and _modules_after_foldable_norm(second) is not None
                    and _pair_compatible(first, second)):
                pairs.append((first, second))
    return pairs


def _module_paths(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """For every module object, each (parent, attribute name) that holds it."""
    paths: Dict[int, List[Tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                paths[id(child)].append((parent, name))
    return paths


def _drop_conflicts(pairs: Iterable[Tuple[nn.Module, nn.Module]]) -> List[Tuple[nn.Module, nn.Module]]:
    """Keep only pairs whose conv and norm take part in no other pair."""
    pairs = list(pairs)
    count: Dict[int, int] = defaultdict(int)
    for conv, norm in pairs:
        count[id(conv)] += 1
        count[id(norm)] += 1
    return [(c, n) for c, n in pairs if count[id(c)] == 1 and count[id(n)] == 1]


def fold_norms(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BN-like norm that directly follows a convolution into that convolution.

    Args:
        model: any module. Convolutions are ``nn.Conv{1,2,3}d`` and ``CenConv{1,2,3}d`` (folded
            with their centralized weight); norms are ``_BatchNorm`` subclasses with running
            statistics (BN, SyncBN, BatchRenorm, MABN) and ``FrozenBatchNorm2d``, also inside
            :class:`~mabn.NormAct` and as norm-activation layers (timm's ``BatchNormAct2d``).
        inplace: edit ``model`` itself instead of a deep copy.

    Returns:
        The model (a deep copy unless ``inplace``) in eval mode, where each folded conv is a
        plain ``nn.Conv{1,2,3}d`` with bias (same hyper-parameters, dtype and device, parameters
        computed in float64) and each folded norm is ``nn.Identity`` (a norm-activation layer:
        ``NormAct(nn.Identity(), drop, act)``). Its eval outputs equal the
        input model's eval outputs up to rounding.

    A pair is folded when, in the ``torch.fx`` trace of ``model``, the conv's output goes only to
    the norm, the norm takes nothing else, and each of the two module objects is called exactly
    once (and its tensors are not read elsewhere in the graph). If ``model`` cannot be traced,
    a warning is issued and only convs immediately followed by a norm inside an ``nn.Sequential``
    are folded (when neither module object is held anywhere else in the model). Norms without
    a preceding foldable conv stay as they are; ``ConvTranspose`` layers are not folded.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()

    paths = _module_paths(model)
    try:
        pairs = _fx_pairs(model)
    except Exception as exc:  # untraceable forward (data-dependent control flow, ...)
        warnings.warn(
            f"fold_norms: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            f"folding only conv -> norm pairs that are consecutive children of nn.Sequential containers",
            RuntimeWarning, stacklevel=2)
        pairs = [(c, n) for c, n in _sequential_pairs(model)
                 if len(paths[id(c)]) == 1 and len(paths[id(n)]) == 1]
    pairs = _drop_conflicts(pairs)

    for conv, norm in pairs:
        fused = _fold(conv, norm)
        replacement = _folded_norm_replacement(_modules_after_foldable_norm(norm))
        for parent, name in paths[id(conv)]:
            setattr(parent, name, fused)
        for parent, name in paths[id(norm)]:
            setattr(parent, name, replacement)
    return model.eval()
