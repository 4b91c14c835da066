"""What torch's CUDA batch-norm kernels accept, checked on the CPU.

The norms call ``aten.native_batch_norm`` and ``aten.native_batch_norm_backward`` directly. The
CPU kernels tolerate arguments that the CUDA kernels (torch 2.x,
``aten/src/ATen/native/cuda/Normalization.cu`` and ``Normalization.cuh``) reject, so a CPU run
proves nothing about a GPU run. :class:`BatchNormContract` is a ``TorchDispatchMode`` that records
every batch-norm kernel call and checks it against the CUDA contract:

* ``native_batch_norm_backward``: ``save_mean`` and ``save_invstd`` are defined (the unfused CUDA
  path asserts it); an empty one is allowed only in eval mode with the running statistics given.
  ``weight`` is defined whenever a weight or bias gradient is requested (the CUDA reductions
  allocate those gradients with ``weight.options()``). ``save_mean`` and ``save_invstd`` that the
  caller made itself have the input's accumulation dtype (float32 for float16/bfloat16/float32
  input, float64 for float64); next to float16/bfloat16 input that is only accepted by both
  devices in mixed mode, so the parameters are float32 there too. (The ones a batch-norm forward
  kernel returned are passed on as they are: each device's kernel returns what its backward reads.)
* Both ops: the parameters and running statistics that are given share one dtype, the input's or
  (for float16/bfloat16 input only) float32: the kernels read them through typed accessors.
  Per-channel tensors have ``C`` elements; ``grad_out`` has the input's shape and dtype.
* ``native_batch_norm`` in eval mode gets the running statistics.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["BatchNormContract", "contract_violations"]

aten = torch.ops.aten
_REDUCED = (torch.float16, torch.bfloat16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _parameter_problems(input: torch.Tensor, named: Dict[str, Optional[torch.Tensor]]) -> List[str]:
    """The dtype and size rules for weight, bias and the running statistics."""
    problems = []
    channels = input.shape[1]
    given = {name: tensor for name, tensor in named.items() if tensor is not None}
    dtypes = {tensor.dtype for tensor in given.values()}
    allowed = {input.dtype, torch.float32} if input.dtype in _REDUCED else {input.dtype}
    if len(dtypes) > 1:
        problems.append("parameters in several dtypes: " + ", ".join(f"{n} {t.dtype}" for n, t in given.items()))
    elif dtypes and not dtypes <= allowed:
        problems.append(f"parameters in {dtypes.pop()} for {input.dtype} input")
    for name, tensor in given.items():
        if tensor.numel() != channels:
            problems.append(f"{name} has {tensor.numel()} elements for {channels} channels")
    return problems


def _backward_problems(args: tuple, from_kernel: bool = False) -> List[str]:
    """``from_kernel``: ``save_mean`` came from a batch-norm forward kernel."""
    grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, _, mask = args
    problems = []
    if input.dtype in _REDUCED and not from_kernel and weight is not None and weight.dtype != torch.float32:
        problems.append(f"own save_mean/save_invstd next to {input.dtype} input need float32 parameters "
                        f"(mixed mode), got weight in {weight.dtype}")
    if grad_out.shape != input.shape or grad_out.dtype != input.dtype:
        problems.append(f"grad_out {tuple(grad_out.shape)} {grad_out.dtype} for input "
                        f"{tuple(input.shape)} {input.dtype}")
    if save_mean is None or save_invstd is None:
        problems.append("save_mean/save_invstd undefined (CUDA asserts they are defined)")
    else:
        if save_mean.dtype != save_invstd.dtype:
            problems.append(f"save_mean {save_mean.dtype} but save_invstd {save_invstd.dtype}")
        wanted = _accumulation_dtype(input.dtype)
        for name, tensor in (("save_mean", save_mean), ("save_invstd", save_invstd)):
            if tensor.numel() == 0:
                if train or running_mean is None or running_var is None:
                    problems.append(f"empty {name} needs train=False and the running statistics")
            elif tensor.dtype != wanted and not from_kernel:
                problems.append(f"{name} in {tensor.dtype}; CUDA reads it as {wanted} for {input.dtype} input")
            elif tensor.numel() != input.shape[1]:
                problems.append(f"{name} has {tensor.numel()} elements for {input.shape[1]} channels")
    if (mask[1] or mask[2]) and weight is None:
        problems.append("weight undefined while a weight or bias gradient is requested")
    return problems + _parameter_problems(input, {"weight": weight, "running_mean": running_mean,
                                                  "running_var": running_var})


def _forward_problems(args: tuple) -> List[str]:
    input, weight, bias, running_mean, running_var, training = args[:6]
    problems = _parameter_problems(input, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                           "running_var": running_var})
    if not training and (running_mean is None or running_var is None):
        problems.append("eval-mode batch norm without running statistics")
    return problems


def _legit_no_stats_problems(args: tuple) -> List[str]:
    input, weight, bias = args[:3]
    return _parameter_problems(input, {"weight": weight, "bias": bias})


_CHECKS = {
    aten.native_batch_norm_backward.default: _backward_problems,
    aten.native_batch_norm.default: _forward_problems,
    aten._native_batch_norm_legit.default: _forward_problems,
    aten._native_batch_norm_legit_no_training.default:
        lambda args: _forward_problems(args[:5] + (False,)),
    aten._native_batch_norm_legit.no_stats: _legit_no_stats_problems,
}


def _pointer(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class BatchNormContract(TorchDispatchMode):
    """Records each batch-norm kernel call (``calls``) and each contract violation
    (``violations``: ``"op: problem"`` strings) made inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []
        self.violations: List[str] = []
        self._saved: set = set()  # storages of save_mean/save_invstd returned by forward kernels

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        check = _CHECKS.get(func)
        if check is None:
            return func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.calls.append(name)
        arguments = tuple(args) + tuple(kwargs.values())
        if func is aten.native_batch_norm_backward.default:
            save_mean = arguments[5]
            problems = _backward_problems(arguments, save_mean is not None and _pointer(save_mean) in self._saved)
        else:
            problems = check(arguments)
        self.violations.extend(f"{name}: {problem}" for problem in problems)
        out = func(*args, **kwargs)
        if func is not aten._native_batch_norm_legit_no_training.default and isinstance(out, tuple):
            self._saved.update(_pointer(t) for t in out[1:3] if isinstance(t, torch.Tensor) and t.numel())
        return out


def contract_violations(run) -> List[str]:
    """The violations of the calls ``run()`` makes."""
    with BatchNormContract() as contract:
        run()
    return contract.violations
