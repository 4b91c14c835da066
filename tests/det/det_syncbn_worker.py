"""Run by test_det_syncbn.py in a subprocess: 2 gloo processes, one training step of the tiny
SyncBN detector each on different images; prints whether the body's running means agree."""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from det_helpers import LOSSES, images_and_targets, tiny_config

    from det.modeling import build_detection_model

    torch.manual_seed(0)
    model = build_detection_model(tiny_config(sys.argv[1])).train()
    images, targets = images_and_targets(seed=rank)
    losses = model(images, targets)
    assert set(losses) == LOSSES
    sum(losses.values()).backward()
    results[rank] = model.backbone.body.bn1.running_mean.clone()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    shared = mp.Manager().dict()
    mp.spawn(_run, args=(free_port, shared), nprocs=2)
    print("same" if torch.equal(shared[0], shared[1]) else "different")
