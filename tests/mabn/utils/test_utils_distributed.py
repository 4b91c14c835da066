"""mabn.utils.distributed in one process (multi-process launches are tested through the trainers,
in subprocesses: tests/cls/test_cls_launch.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mabn.utils.distributed import DistEnv, check_on_main_rank, init_distributed, wrap_data_parallel
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
            init_distributed("cuda")


def test_wrap_data_parallel_is_the_model_itself_in_one_process():
    model = nn.Linear(2, 2)
    assert wrap_data_parallel(model, DistEnv()) is model


def test_check_on_main_rank_raises_the_check_error(plain_process):
    env = DistEnv()
    check_on_main_rank(env, lambda: None)

    def refuse():
        raise UserError("--save x is in use")

    with pytest.raises(UserError, match="--save x is in use"):
        check_on_main_rank(env, refuse)
