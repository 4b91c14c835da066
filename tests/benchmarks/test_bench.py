"""The benchmark's baseline is a correct MABN, and the benchmark's core produces sound results."""
import json

import pytest
import torch
from torch import nn

from mabn import MABN2d
from benchmarks import bench
from benchmarks.naive_mabn import NaiveMABN2d


def _max_rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("warmup_iters,r_warmup_iters", [(0, 0), (5, 12)], ids=["bench-settings", "schedules"])
def test_naive_baseline_matches_mabn2d(warmup_iters, r_warmup_iters):
    """Forward, input/weight/bias gradients and running_var over 30 iterations (W = 8)."""
    torch.manual_seed(0)
    fast = MABN2d(4, 2, 16, warmup_iters=warmup_iters, r_warmup_iters=r_warmup_iters)
    naive = NaiveMABN2d(4, 2, 16, warmup_iters=warmup_iters, r_warmup_iters=r_warmup_iters)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-0.5, 0.5)
        naive.weight.copy_(fast.weight)
        naive.bias.copy_(fast.bias)
    for it in range(30):
        # the scale jumps every 6 iterations so that r hits both clamp bounds once enabled
        level = (0.05, 1.0, 12.0)[(it // 6) % 3]
        x = torch.randn(2, 4, 5, 6) * level + 0.1 * level
        dy = torch.randn_like(x)
        x_fast, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_fast, y_naive = fast(x_fast), naive(x_naive)
        y_fast.backward(dy)
        y_naive.backward(dy)
        for name, a, b in [("y", y_naive, y_fast), ("dx", x_naive.grad, x_fast.grad),
                           ("dw", naive.weight.grad, fast.weight.grad), ("db", naive.bias.grad, fast.bias.grad),
                           ("running_var", naive.running_var, fast.running_var)]:
            assert _max_rel(a, b) <= 1e-4, f"iteration {it + 1}: {name} differs"
        fast.zero_grad()
        naive.zero_grad()
    assert int(naive.iters) == int(fast.num_batches_tracked) == 30
    fast.eval()
    naive.eval()
    x = torch.randn(2, 4, 5, 6)
    assert _max_rel(naive(x), fast(x)) <= 1e-4


def test_interleaved_rounds_rotate_and_skip_warmup():
    calls = []
    cases = {name: bench.Case(run=lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.interleaved_times(cases, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_cpu_memory_measures():
    """Peak live bytes and saved-for-backward bytes on a case whose sizes are known."""
    weight = nn.Parameter(torch.randn(256, 256))   # 256 KiB, excluded from "saved"
    x = torch.randn(1024, 256)                     # 1 MiB, exists before the step

    def run():
        h = (x @ weight).relu()       # 1 MiB (+ relu output 1 MiB; mm output freed after relu)
        h.sum().backward()            # weight.grad 256 KiB
    case = bench.Case(run=run, prepare=lambda: setattr(weight, "grad", None), params=(weight,))
    memory = bench.measure_memory(case, torch.device("cpu"), saved=True)
    # saved: x (by mm) and the relu output; the weight is a parameter
    assert memory["saved_mib"] == pytest.approx(2.0, abs=0.01)
    # peak: mm output + relu output + relu's grad + grad of mm output, or thereabouts; never < 2 MiB
    assert 2.0 <= memory["peak_mib"] <= 4.5


def test_core_functions_tiny_run_produce_sound_json():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = bench.BenchConfig(layer_shapes=((4, 32, 6, 6),), layer_rounds=2, layer_warmup=1, resolution=64,
                                   train_batches=(2,), infer_batch=2, train_rounds=1, infer_rounds=1,
                                   resnet_warmup=1, arch="resnet18")
        results = bench.run_benchmark(config, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    results = json.loads(json.dumps(results))   # JSON-serializable as written by --json
    assert {"machine", "config", "memory", "notes", "layers", "resnet_train", "resnet_infer", "targets",
            "elapsed_s"} <= set(results)
    machine = results["machine"]
    assert machine["torch"] == torch.__version__ and machine["threads"] == 1 and machine["device"] == "cpu"
    assert "cpu_model" in machine

    layer_variants = [row["variant"] for row in results["layers"]]
    assert layer_variants == ["BN", "MABN", bench.SPLIT_VARIANT, "MABN naive", "BRN", "GN", "IN", "LN"]
    assert [row["variant"] for row in results["resnet_train"]] == list(bench.TRAIN_VARIANTS)
    assert [row["variant"] for row in results["resnet_infer"]] == list(bench.INFER_VARIANTS)
    for section, rounds in (("layers", 2), ("resnet_train", 1), ("resnet_infer", 1)):
        for row in results[section]:
            assert row["median_ms"] > 0 and len(row["times_ms"]) == rounds
            assert all(t > 0 for t in row["times_ms"])
            assert row["ratio_to_bn"] > 0
            if row["variant"] == "BN":
                assert row["ratio_to_bn"] == 1.0
    for row in results["resnet_train"]:
        assert row["finite"] and row["peak_mib"] > 0 and row["saved_mib"] > 0
    for row in results["resnet_infer"]:
        assert row["finite"] and row["peak_mib"] > 0 and row["ratio_to_no_norm"] > 0
        if row["variant"].endswith("folded"):
            assert row["max_rel_diff_to_unfolded"] < 1e-3
    no_norm = next(r for r in results["resnet_infer"] if r["variant"] == "no norm")
    assert no_norm["ratio_to_no_norm"] == 1.0

    names = [t["name"] for t in results["targets"]]
    assert len(names) == 3 and all(isinstance(t["passed"], bool) and t["measured"] > 0 for t in results["targets"])
    text = bench.format_markdown(results)
    assert "| MABN naive |" in text and ("PASS" in text or "MISS" in text)
