"""Inference over the test datasets, sharded across ranks, and COCO evaluation on rank 0.

Each rank runs the network in eval mode on its shard (:class:`det.data.ShardSampler`) and turns
its outputs into COCO results batch by batch (pasted masks are large; the results are small);
the results are gathered, and rank 0 evaluates and writes ``OUTPUT_DIR/inference/<dataset>/``
(:mod:`det.evaluation`). Every rank evaluates with rank 0's buffers (the normalization
statistics a checkpoint's ``model`` holds), so an evaluation during training equals ``test_net.py``
on that checkpoint; each rank's own buffers and the network's train/eval mode come back
afterwards bit for bit: evaluating never disturbs MABN's moving averages.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from det.data import COCODataset
from det.evaluation import coco_results, evaluate_dataset, gather_results, merge_results
from mabn.utils.distributed import DistEnv, rank0_buffers
from mabn.utils.run_log import RunLog

__all__ = ["Metrics", "evaluation_mode", "inference"]

Metrics = Dict[str, Dict[str, Dict[str, float]]]  # dataset -> iou type -> metric -> value


@contextlib.contextmanager
def evaluation_mode(network: nn.Module, env: DistEnv) -> Iterator[None]:
    """``network.eval()`` with rank 0's buffers on every rank; afterwards this rank's buffers
    and the previous train/eval mode of every module."""
    modes = [(module, module.training) for module in network.modules()]
    try:
        with rank0_buffers(network, env):
            network.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def _predict(network: nn.Module, dataset: COCODataset, loader: DataLoader, env: DistEnv, precision,
             log: RunLog, desc: str) -> Dict[str, List[dict]]:
    parts = []
    with contextlib.closing(log.progress(len(loader), 0, desc)) as bar:
        for images, _, indices in loader:
            images = [image.to(env.device, non_blocking=True) for image in images]
            with precision.autocast():
                outputs = network(images)
            outputs = [{key: value.float().cpu() if value.is_floating_point() else value.cpu()
                        for key, value in output.items()} for output in outputs]
            parts.append(coco_results(dataset, dict(zip(indices, outputs))))
            bar.update()
    return merge_results(parts) if parts else {}


def inference(network: nn.Module, loaders: Sequence[Tuple[str, COCODataset, DataLoader]], env: DistEnv,
              output_dir: str, precision, log: RunLog, iou_types: Sequence[str] = ("bbox", "segm")) -> Metrics:
    """Evaluate ``network`` on every ``(name, dataset, loader)`` for ``iou_types`` ("bbox", and
    "segm" for a Mask R-CNN); the metrics on every rank."""
    metrics: Metrics = {}
    with evaluation_mode(network, env):
        for name, dataset, loader in loaders:
            start = time.perf_counter()
            log.info(f"Start evaluation on {name} dataset ({len(dataset)} images, {env.world_size} process(es))")
            local = _predict(network, dataset, loader, env, precision, log, f"test {name}")
            results = gather_results(local)
            seconds = time.perf_counter() - start
            log.info(f"Total inference time: {seconds:.1f} s ({seconds * env.world_size / max(len(dataset), 1):.3f} "
                     f"s / img per device, on {env.world_size} devices)")
            found = None
            if env.is_main:
                found = evaluate_dataset(dataset, results, output_dir, iou_types=iou_types, log=log.info)
            metrics[name] = env.broadcast_object(found)
    return metrics
