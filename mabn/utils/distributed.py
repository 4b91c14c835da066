"""Launcher environment, device, process group and data-parallel wrapping.

Works under ``python -m torch.distributed.launch`` (``--local-rank=N`` on the command line and
``LOCAL_RANK`` in the environment), ``torchrun`` (environment only), multi-node launches and a
plain ``python train.py`` (one process, no process group). The backend is NCCL on CUDA and gloo
on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from mabn.utils.errors import UserError

__all__ = ["DistEnv", "GradientAveraging", "average_gradients", "init_distributed", "destroy_distributed",
           "check_on_main_rank", "wrap_data_parallel", "rank0_buffers", "resolve_device"]


@dataclass
class DistEnv:
    """Where this process runs: its rank, the world, its device and the backend (None: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (on the collective's device) and return it."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def resolve_device(name: str, option: str = "device") -> torch.device:
    """The device a setting names: "cpu", "cuda", "cuda:<k>", or "auto" (CUDA when available).
    ``option`` is how the app names the setting in its one-line errors (a flag or a config key)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} {name!r}: use 'cpu', 'cuda', 'cuda:<k>' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {name!r} but CUDA is not available here; pass {option} cpu (or auto)")
    return device


def _device(device: str, local_rank: int, device_option: str) -> torch.device:
    """The device of this process, made current on CUDA: ``cuda:<local rank>``, or
    ``cuda:<local rank % visible devices>`` when fewer devices are visible than the local rank
    needs, as where the launcher gives each process its own GPU through ``CUDA_VISIBLE_DEVICES``
    (SLURM, some Kubernetes setups); one ``warning:`` line on stderr says so."""
    if device == "auto":
        device = resolve_device("auto").type
    if device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{device_option} cuda but CUDA is not available (use {device_option} cpu or auto)")
    count = torch.cuda.device_count()
    index = local_rank % count
    if index != local_rank:
        print(f"warning (local rank {local_rank}): {count} CUDA device(s) visible, using cuda:{index}",
              file=sys.stderr, flush=True)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", local_rank_flag: Optional[int] = None,
                     timeout_s: float = 1800.0, device_option: str = "device") -> DistEnv:
    """Read the launcher's environment, pick the device and initialize the process group.

    ``local_rank_flag`` is the ``--local_rank`` of ``torch.distributed.launch``; ``LOCAL_RANK``
    wins when both are present. ``device_option`` is how the app names its device setting in
    errors (a flag or a config key).
    """
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = local_rank_flag if local_rank_flag is not None else 0
    local_world_size = _env_int("LOCAL_WORLD_SIZE") or (world_size if world_size > 1 else 1)
    launched = "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ and _env_int("WORLD_SIZE") is not None
    if world_size > 1 and not launched:
        raise UserError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun")
    torch_device = _device(device, local_rank, device_option)
    backend = None
    if launched:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                   local_world_size=local_world_size, device=torch_device, backend=backend)


def check_on_main_rank(env: DistEnv, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 only (a file-system check, taking a lock) and raise the
    :class:`UserError` it raises on every rank, so that all of them stop together."""
    message = None
    if env.is_main:
        try:
            check()
        except UserError as exc:
            message = str(exc)
    message = env.broadcast_object(message)
    if message is not None:
        raise UserError(message)


@contextlib.contextmanager
def rank0_buffers(module: nn.Module, env: DistEnv) -> Iterator[None]:
    """Rank 0's buffers in ``module`` on every rank within the block (so that every rank evaluates
    with the statistics a checkpoint holds); this rank's own buffers, bit for bit, afterwards.
    Nothing happens without a process group or with one process."""
    if not env.distributed or env.world_size == 1:
        yield
        return
    buffers = list(module.buffers())
    saved = [buffer.detach().clone() for buffer in buffers]
    try:
        for buffer in buffers:
            dist.broadcast(buffer, src=0)
        yield
    finally:
        with torch.no_grad():
            for buffer, own in zip(buffers, saved):
                buffer.copy_(own)


def destroy_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class GradientAveraging(nn.Module):
    """Data parallelism without DDP: forward as the wrapped module; after the backward,
    :meth:`average_gradients` all-reduces every gradient (one flat buffer) and divides by the world
    size, which is what DDP does. Callers use the function :func:`average_gradients`, which works
    for any model.

    Used only where DDP refuses the model: ``torch.nn.parallel.DistributedDataParallel`` rejects
    ``SyncBatchNorm`` layers in CPU modules, while ``mabn.SyncBatchNorm`` works on CPU/gloo.
    Buffers are never synchronized (as with ``broadcast_buffers=False``).
    """

    def __init__(self, module: nn.Module, world_size: int):
        super().__init__()
        self.module = module
        self.world_size = world_size
        with torch.no_grad():  # start from rank 0's parameters, as DDP does
            for parameter in module.parameters():
                dist.broadcast(parameter, src=0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def average_gradients(self) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def average_gradients(model: nn.Module) -> None:
    """Call after every backward of a model from :func:`wrap_data_parallel`: averages the gradients
    over processes for :class:`GradientAveraging` (one all-reduce); nothing for DDP (which averaged
    them during the backward) or a plain module."""
    if isinstance(model, GradientAveraging):
        model.average_gradients()


def wrap_data_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` for training on every rank: itself in one process, else DDP with rank-local
    buffers (``broadcast_buffers=False``), or :class:`GradientAveraging` for SyncBatchNorm on CPU,
    which DDP refuses. Call :func:`average_gradients` on the result after every backward."""
    if not env.distributed:
        return model
    if env.device.type == "cpu" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return GradientAveraging(model, env.world_size)
    with warnings.catch_warnings():
        # Recent torch deprecates broadcast_buffers in favour of forward_sync_buffers, which still
        # syncs buffers at init; rank-local buffers need broadcast_buffers=False.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False)
