"""mabn.utils.distributed in one process (multi-process launches are tested through the trainers,
in subprocesses: tests/cls/test_cls_launch.py)."""
from __future__ import annotations

import contextlib
from typing import List

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mabn.utils.distributed import (DistEnv, GradientAveraging, average_gradients, check_on_main_rank,
                                    init_distributed, rank0_buffers, resolve_device, wrap_data_parallel)
from mabn.utils.errors import UserError

_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture()
def plain_process(monkeypatch):
    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_a_launcher(plain_process):
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.backend, env.is_main, env.distributed) == \
        (0, 1, 0, None, True, False)
    tensor = torch.ones(2)
    assert env.all_reduce_sum(tensor) is tensor and env.all_gather_object("x") == ["x"]
    assert env.broadcast_object(5) == 5
    env.barrier()


def test_local_rank_flag_and_variable(plain_process):
    assert init_distributed("cpu", local_rank_flag=3).local_rank == 3  # torch.distributed.launch --local-rank=3
    plain_process.setenv("LOCAL_RANK", "1")
    assert init_distributed("cpu", local_rank_flag=3).local_rank == 1  # the variable wins


def test_bad_environments_are_user_errors(plain_process):
    plain_process.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="MASTER_ADDR/MASTER_PORT are not set"):
        init_distributed("cpu")
    plain_process.delenv("WORLD_SIZE")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda but CUDA is not available"):
            init_distributed("cuda", device_option="--device")  # the app names its own setting
        with pytest.raises(UserError, match="^device cuda but CUDA is not available"):
            init_distributed("cuda")


def _fake_cuda(monkeypatch, visible: int) -> List[int]:
    """CUDA with ``visible`` devices; returns the indices passed to ``torch.cuda.set_device``."""
    chosen: List[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("visible, indices", [(1, [0, 0, 0, 0]), (2, [0, 1, 0, 1]), (4, [0, 1, 2, 3])])
def test_local_ranks_beyond_the_visible_devices_wrap_around(plain_process, capsys, visible, indices):
    chosen = _fake_cuda(plain_process, visible)
    for local_rank, index in enumerate(indices):
        plain_process.setenv("LOCAL_RANK", str(local_rank))
        env = init_distributed("cuda")
        assert (env.local_rank, env.device, env.backend) == (local_rank, torch.device("cuda", index), None)
        assert chosen[-1] == index
        lines = capsys.readouterr().err.splitlines()
        if local_rank < visible:
            assert lines == []
        else:
            assert lines == [f"warning (local rank {local_rank}): {visible} CUDA device(s) visible, "
                             f"using cuda:{index}"]
    assert chosen == indices
    assert init_distributed("auto").device == torch.device("cuda", indices[-1])


def test_the_collectives_use_the_chosen_device(plain_process):
    _fake_cuda(plain_process, 2)
    plain_process.setenv("LOCAL_RANK", "3")
    env = init_distributed("cuda")
    env.backend = "nccl"  # as after a launch; the collectives themselves are faked below
    barriers: List[dict] = []
    plain_process.setattr(dist, "barrier", lambda **kwargs: barriers.append(kwargs))
    env.barrier()
    assert barriers == [{"device_ids": [1]}]
    wrapped: List[dict] = []
    plain_process.setattr(nn.parallel, "DistributedDataParallel", lambda model, **kwargs: wrapped.append(kwargs))
    wrap_data_parallel(nn.Linear(2, 2), env)
    assert wrapped == [{"device_ids": [1], "broadcast_buffers": False}]


def test_wrap_data_parallel_is_the_model_itself_in_one_process():
    model = nn.Linear(2, 2)
    assert wrap_data_parallel(model, DistEnv()) is model


def test_average_gradients_all_reduces_only_for_gradient_averaging(monkeypatch):
    """One flat all-reduce, divided by the world size, for GradientAveraging; nothing otherwise."""
    reduced: List[torch.Tensor] = []

    def all_reduce(tensor, op=None):  # a second rank whose gradients are 3 times this one's
        reduced.append(tensor.clone())
        tensor.mul_(4.0)

    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: None)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    plain = nn.Linear(2, 3)
    plain(torch.ones(1, 2)).sum().backward()
    before = [p.grad.clone() for p in plain.parameters()]
    average_gradients(plain)
    assert reduced == [] and all(torch.equal(p.grad, g) for p, g in zip(plain.parameters(), before))

    wrapped = GradientAveraging(plain, world_size=2)
    average_gradients(wrapped)
    assert len(reduced) == 1 and reduced[0].numel() == sum(p.numel() for p in plain.parameters())
    assert all(torch.equal(p.grad, 2.0 * g) for p, g in zip(plain.parameters(), before))


def test_check_on_main_rank_raises_the_check_error(plain_process):
    env = DistEnv()
    check_on_main_rank(env, lambda: None)

    def refuse():
        raise UserError("--save x is in use")

    with pytest.raises(UserError, match="--save x is in use"):
        check_on_main_rank(env, refuse)


def _network_with_buffers() -> nn.Module:
    network = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(3))
    network[1].running_var.fill_(2.0)
    network[1].num_batches_tracked.fill_(7)
    return network


def test_rank0_buffers_is_a_no_op_without_a_process_group(monkeypatch):
    """One process (no group), or a group of one: no collective, the buffers stay as they are."""
    monkeypatch.setattr(dist, "broadcast", lambda *a, **k: pytest.fail("broadcast without a process group"))
    network = _network_with_buffers()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    for env in (DistEnv(), DistEnv(world_size=1, backend="gloo")):
        with rank0_buffers(network, env):
            network[1].running_var.add_(1.0)  # what an evaluation might do: kept, nothing restores
    assert torch.equal(network[1].running_var, before["1.running_var"] + 2.0)


@pytest.mark.parametrize("fail", [False, True])
def test_rank0_buffers_broadcasts_every_buffer_and_restores_this_ranks_own(monkeypatch, fail):
    """Rank 0's buffers inside the block (every buffer broadcast from rank 0, in place), this
    rank's own bit for bit afterwards, also when the block raises."""
    sent: List[torch.Tensor] = []

    def fake_broadcast(tensor, src):
        assert src == 0
        sent.append(tensor)
        tensor.fill_(-3)  # "rank 0's" values

    monkeypatch.setattr(dist, "broadcast", fake_broadcast)
    network = _network_with_buffers()
    own = {k: v.clone() for k, v in network.named_buffers()}
    env = DistEnv(rank=1, world_size=2, backend="gloo")
    with pytest.raises(RuntimeError, match="evaluation failed") if fail else contextlib.nullcontext():
        with rank0_buffers(network, env):
            assert [id(t) for t in sent] == [id(b) for b in network.buffers()]
            assert all(bool((b == -3).all()) for b in network.buffers())
            if fail:
                raise RuntimeError("evaluation failed")
    for name, buffer in network.named_buffers():
        assert torch.equal(buffer, own[name]) and buffer.dtype == own[name].dtype, name


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"^--device 'gpu': use 'cpu', 'cuda', 'cuda:<k>' or 'auto'$"):
        resolve_device("gpu", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"^MODEL.DEVICE '{name}' but CUDA is not available here; "
                                            rf"pass MODEL.DEVICE cpu \(or auto\)$"):
            resolve_device(name, "MODEL.DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
