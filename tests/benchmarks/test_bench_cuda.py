"""The benchmark on a GPU: CUDA-event timing, kernel launches from the profiler, the ResNet step.

Marked ``cuda``: skipped without a CUDA device. The tiny end-to-end run takes well under a minute
on an H100. No assertion looks at a timing value beyond its being positive.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks import bench
from benchmarks.harness import (CUDA_EVENT, CUDA_SAMPLE_S, MAX_REPEATS, Case, count_kernel_launches, cuda_event_seconds,
                                interleaved_times)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.cuda


def test_tiny_cuda_run_times_with_events_and_counts_kernels(real_cuda_device, tmp_path):
    path = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--device", "cuda", "--tiny", "--json", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(path.read_text())
    machine = results["machine"]
    assert machine["device"] == "cuda" and machine["timer"] == CUDA_EVENT and machine["gpu"]
    assert machine["gpu"] in done.stdout and "kernels vs BN" in done.stdout

    ops = {row["variant"]: row for row in results["ops"]}
    assert ops[bench.MABN]["kernels"] > 0 and ops[bench.BN]["kernels"] > 0 and ops[bench.GN]["kernels"] > 0
    assert ops[bench.BN]["kernels_vs_bn"] == 1.0 and ops[bench.GN]["kernels_vs_gn"] == 1.0
    assert sum(ops[bench.MABN]["by_kernel"].values()) == ops[bench.MABN]["kernels"]
    for fused, eager in bench.FUSED_OF.items():   # fused_statistics=True: one Triton kernel per pass
        assert ops[fused]["triton_launches"] == 2 and ops[fused]["kernels"] < ops[eager]["kernels"], fused
    assert {row["variant"] for row in results["layers"]} >= {bench.MABN, bench.MABN_FUSED}

    for row in results["layers"] + results["train"] + results["infer"]:
        assert row["timer"] == CUDA_EVENT and row["repeats"] >= 1 and row["median_ms"] > 0
    train = results["train"]
    assert [row["variant"] for row in train] == list(bench.TRAIN_VARIANTS) + [bench.MABN_CENCONV_FUSED]
    assert all(row["batch"] == 2 and row["finite"] for row in train)
    assert all(row["ratio_to_bn"] > 0 and row["ratio_to_gn"] > 0 for row in train)


def test_kernel_counter_sees_a_batch_norm_forward_backward(real_cuda_device):
    layer = nn.BatchNorm2d(8).to(real_cuda_device).train()
    x = torch.randn(2, 8, 4, 4, device=real_cuda_device, requires_grad=True)
    case = Case(run=lambda: layer(x).sum().backward(), prepare=lambda: setattr(x, "grad", None))
    case.prepare()
    case.run()
    launches = count_kernel_launches(case, real_cuda_device)
    assert launches is not None and launches.kernels > 0
    assert sum(launches.by_kernel.values()) == launches.kernels


def test_cuda_event_samples_are_calibrated_to_a_millisecond(real_cuda_device):
    a = torch.randn(1024, 1024, device=real_cuda_device)
    cases = {"matmul": Case(run=lambda: a @ a), "copy": Case(run=a.clone)}
    assert cuda_event_seconds(cases["matmul"], 4, real_cuda_device) > 0
    times = interleaved_times(cases, rounds=3, warmup=1, device=real_cuda_device)
    assert times.timer == CUDA_EVENT and times.repeats["copy"] > 1   # a 4 MiB clone is far below 1 ms
    assert all(len(seconds) == 3 and min(seconds) > 0 for seconds in times.values())
    for name, k in times.repeats.items():   # every sample lasts about CUDA_SAMPLE_S or more
        assert k == MAX_REPEATS or k * min(times[name]) >= 0.5 * CUDA_SAMPLE_S
