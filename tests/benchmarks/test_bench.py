"""End to end: the CLI runs every section on tiny sizes and writes well-formed JSON.

No assertion looks at a timing value; only structure and correctness checks (fold accuracy).
"""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from benchmarks import bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=280)


def test_tiny_run_writes_well_formed_json(tmp_path):
    path = tmp_path / "bench.json"
    done = _run("--tiny", "--threads", "1", "--json", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(path.read_text())
    assert {"machine", "config", "notes", "ops", "layers", "train", "infer", "compiled_mabn_kernels",
            "targets", "elapsed_s"} <= set(results)
    assert results["config"]["name"] == "tiny" and results["machine"]["threads"] == 1

    assert [row["variant"] for row in results["ops"]] == list(bench.OP_COUNT_VARIANTS)
    assert all(row["ops"] == sum(row["by_op"].values()) > 0 for row in results["ops"])
    assert all(row["kernels"] is None and row["kernels_vs_bn"] is None for row in results["ops"])   # CPU
    assert "Dispatched operators only" in done.stdout
    assert results["machine"]["timer"] == "perf_counter"
    for row in results["layers"] + results["train"] + results["infer"]:
        assert row["timer"] == "perf_counter" and row["repeats"] >= 1
    for row in results["layers"]:
        assert len(row["times_ms"]) == 2 and row["median_ms"] > 0
        assert row["ratio_to_bn"] > 0 and row["ratio_to_gn"] > 0 and row["copies"] > 0
    layer_variants = {(tuple(row["shape"]), row["variant"]) for row in results["layers"]}
    assert ((4, 8, 6, 6), bench.GHOST) in layer_variants and ((4, 8, 6, 6), bench.SPLIT) in layer_variants
    assert ((2, 8, 4, 4), bench.SPLIT) not in layer_variants   # one group of B=2: nothing to split
    assert [row["variant"] for row in results["train"]] == list(bench.TRAIN_VARIANTS)
    assert all(row["finite"] and row["saved_mib"] > 0 for row in results["train"])
    assert all(row["ratio_to_bn"] > 0 and row["ratio_to_gn"] > 0 for row in results["train"])
    folded = next(row for row in results["infer"] if row["variant"] == bench.MABN_FOLDED)
    assert folded["max_rel_diff_to_unfolded"] < 1e-3

    targets = results["targets"]
    assert targets and all(isinstance(t["passed"], bool) and t["kind"] in ("target", "goal") for t in targets)
    assert all(t["measured"] is not None for t in targets), [t["name"] for t in targets if t["measured"] is None]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS  ", "MISS  "))]
    assert len(verdicts) == len(targets)


def test_bad_argument_fails_fast_with_exit_2():
    done = _run("--rounds", "0")
    assert done.returncode == 2 and "--rounds must be >= 1" in done.stderr


def test_targets_cover_every_configured_shape_and_batch():
    names = [t.name for t in bench.evaluate_targets({}, bench.FULL)]
    for shape in bench.FULL.small_shapes + bench.FULL.full_shapes + bench.FULL.baseline_shapes:
        assert any(bench._shape_str(shape) in name for name in names)
    assert sum("train step b8" in name for name in names) == 0   # reported, not judged
    assert sum("train step b2" in name for name in names) == 1
    assert any(name.startswith("inductor fused kernels") for name in names)
    for variant in bench.OPS_LIMITS:
        assert any(name.startswith(f"{variant} ops") for name in names)


def test_repeat_agreement_reports_the_largest_ratio_change():
    def rows(ratio):
        return [dict(variant=bench.BN, shape=[2, 8, 4, 4], ratio_to_bn=1.0),
                dict(variant=bench.MABN, shape=[2, 8, 4, 4], ratio_to_bn=ratio, ratio_to_gn=None)]

    first = {"layers": rows(2.0), "train": [], "infer": []}
    again = {"layers": rows(2.1), "train": [], "infer": []}
    agreement = bench.repeat_agreement([first, again])
    assert agreement["passes"] == 2 and agreement["max_change"] == pytest.approx(0.05)
    assert agreement["worst"]["row"] == "MABN [2, 8, 4, 4]" and agreement["worst"]["ratio"] == "ratio_to_bn"
    naive = [dict(variant=bench.NAIVE, shape=[2, 8, 4, 4], ratio_to_bn=r) for r in (1.0, 3.0)]
    noisy_context = bench.repeat_agreement([{"layers": rows(2.0) + naive[:1], "train": [], "infer": []},
                                            {"layers": rows(2.1) + naive[1:], "train": [], "infer": []}])
    assert noisy_context["max_change"] == pytest.approx(0.05)   # the naive layer's 200% is listed, not judged
    assert any(not c["judged"] and c["change"] == pytest.approx(2.0) for c in noisy_context["changes"])
    assert bench.repeat_agreement([first]) is None
    results = {"repeat_agreement": agreement}
    target = next(t for t in bench.evaluate_targets(results, bench.QUICK) if "passes" in t.name)
    assert target.limit == bench.REPEAT_AGREEMENT and target.measured == pytest.approx(0.05)


def test_full_and_quick_configs_time_the_resnet50_batch_2_step():
    for config, resolution in ((bench.FULL, 224), (bench.QUICK, 112)):
        assert config.arch == "resnet50" and 2 in config.train_batches and config.resolution == resolution


def test_ops_rows_carry_kernel_launches_and_their_ratios(monkeypatch):
    from benchmarks.harness import KernelLaunches

    counts = dict(zip(bench.OP_COUNT_VARIANTS, (12, 30, 40, 40, 20, 4, 6)))
    variants = iter(bench.OP_COUNT_VARIANTS)
    monkeypatch.setattr(bench, "count_kernel_launches",
                        lambda case, device: KernelLaunches(kernels=counts[next(variants)], transfers=1))
    rows = {row["variant"]: row for row in bench.bench_ops(bench.TINY, torch.device("cpu"))}
    assert rows[bench.MABN]["kernels"] == 12 and rows[bench.MABN]["transfers"] == 1
    assert rows[bench.MABN]["kernels_vs_bn"] == 3.0 and rows[bench.MABN]["kernels_vs_gn"] == 2.0
    assert rows[bench.BN]["kernels_vs_bn"] == 1.0


def test_the_fused_variant_is_benchmarked_where_its_kernels_run(monkeypatch):
    import importlib.util

    assert bench.fused_variants(torch.device("cpu")) == ()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "triton" else None)
    assert bench.fused_variants(torch.device("cuda")) == (bench.MABN_FUSED, bench.SPLIT_FUSED)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert bench.fused_variants(torch.device("cuda")) == ()
    layer = bench.build_layer(bench.MABN_FUSED, 8)
    assert layer.fused_statistics and not layer.split_batch and layer.training
    split = bench.build_layer(bench.SPLIT_FUSED, 8)
    assert split.fused_statistics and split.split_batch and split.B == bench.B


def test_fused_rows_are_held_to_mabn_limits_with_their_triton_launches_as_ops(monkeypatch):
    from benchmarks.harness import KernelLaunches

    monkeypatch.setattr(bench, "fused_variants", lambda device: (bench.MABN_FUSED, bench.SPLIT_FUSED))
    triton = {"_mabn_forward_statistics_kernel": 1, "_mabn_backward_coefficient_kernel": 1}
    variants = iter(bench.OP_COUNT_VARIANTS + (bench.MABN_FUSED, bench.SPLIT_FUSED))

    def launches(case, device):
        kernels = Counter(elementwise=5, **(triton if next(variants) in bench.FUSED_OF else {}))
        return KernelLaunches(kernels=sum(kernels.values()), transfers=0, by_kernel=kernels)

    monkeypatch.setattr(bench, "count_kernel_launches", launches)
    rows = {row["variant"]: row for row in bench.bench_ops(bench.TINY, torch.device("cpu"))}
    fused, plain = rows[bench.MABN_FUSED], rows[bench.MABN]
    assert fused["triton_launches"] == 2 and plain["triton_launches"] == 0
    assert fused["ops"] == 2 + sum(fused["by_op"].values()) and plain["ops"] == sum(plain["by_op"].values())
    assert rows[bench.SPLIT_FUSED]["shape"][0] == bench.TINY.op_grouped_batch
    targets = bench.evaluate_targets({"ops": list(rows.values())}, bench.TINY)
    ops_targets = [t for t in targets if t.name.startswith(bench.MABN_FUSED)]
    assert [t.limit for t in ops_targets] == [bench.OPS_LIMITS[bench.MABN], bench.OPS_MOONSHOT]
    assert all(t.measured == fused["ops"] for t in ops_targets)
    split_targets = [t for t in targets if t.name.startswith(bench.SPLIT_FUSED)]
    assert [(t.limit, t.measured) for t in split_targets] == [(bench.OPS_LIMITS[bench.SPLIT],
                                                               rows[bench.SPLIT_FUSED]["ops"])]
    layers = [dict(shape=list(shape), variant=bench.MABN_FUSED, ratio_to_bn=1.1) for shape in bench.FULL.small_shapes]
    names = [t.name for t in bench.evaluate_targets({"layers": layers}, bench.FULL)]
    assert sum(name.startswith(f"{bench.MABN_FUSED} layer") for name in names) == len(bench.FULL.small_shapes)
    assert not any(name.startswith(bench.MABN_FUSED) for name in
                   (t.name for t in bench.evaluate_targets({}, bench.FULL)))


def test_the_fused_resnet_has_fused_mabn_layers_and_its_own_train_target():
    from mabn import MABN2d

    base = bench._base_resnet("resnet18")
    layers = [m for m in bench.build_resnet(bench.MABN_CENCONV_FUSED, 2, base).modules() if isinstance(m, MABN2d)]
    assert layers and all(layer.fused_statistics for layer in layers)
    plain = [m for m in bench.build_resnet(bench.MABN_CENCONV, 2, base).modules() if isinstance(m, MABN2d)]
    assert plain and not any(layer.fused_statistics for layer in plain)
    train = [dict(variant=v, batch=2, ratio_to_bn=1.0) for v in (bench.MABN_CENCONV, bench.MABN_CENCONV_FUSED)]
    names = [t.name for t in bench.evaluate_targets({"train": train}, bench.FULL)]
    assert sum(name.endswith(f"b2 {bench.MABN_CENCONV_FUSED} vs BN") for name in names) == 1
    assert not any(bench.MABN_CENCONV_FUSED in t.name for t in bench.evaluate_targets({}, bench.FULL))


def _results(device: str) -> dict:
    """A minimal results dict as ``run_benchmark`` returns it, on ``device`` ("cpu" or "cuda")."""
    cuda = device == "cuda"
    timing = dict(timer="cuda_event" if cuda else "perf_counter", repeats=40 if cuda else 1, iqr_pct=1.0)
    machine = dict(torch="2", device=device, threads=1, cpu_model="cpu", timer=timing["timer"])
    if cuda:
        machine["gpu"] = "NVIDIA H100 80GB HBM3"
    kernels = {bench.MABN: 9, bench.BN: 3, bench.GN: 6}
    ops = [dict(variant=v, shape=[2, 8, 4, 4], ops=10, views=2, by_op={}, kernels=kernels[v] if cuda else None,
                transfers=0 if cuda else None, by_kernel={} if cuda else None,
                kernels_vs_bn=kernels[v] / 3 if cuda else None, kernels_vs_gn=kernels[v] / 6 if cuda else None)
           for v in kernels]
    layers = [dict(shape=[2, 8, 4, 4], variant=v, median_ms=0.02, ratio_to_bn=1.5, ratio_to_gn=0.75, copies=4.0,
                   **timing) for v in (bench.BN, bench.MABN, bench.GN)]
    train = [dict(arch="resnet50", batch=2, resolution=224, variant=v, median_ms=30.0, ratio_to_bn=1.04,
                  ratio_to_gn=0.61, saved_mib=100.0, saved_ratio_to_bn=1.0, finite=True, **dict(timing, repeats=1))
             for v in bench.TRAIN_VARIANTS]
    return dict(machine=machine, config=dict(name="full", layer_rounds=30, train_rounds=10, infer_rounds=15),
                notes=[], ops=ops, layers=layers, train=train, infer=[], targets=[], elapsed_s=1.0)


def test_markdown_on_cuda_shows_gpu_kernel_launches_and_event_timing():
    text = bench.format_markdown(_results("cuda"))
    assert "cuda (NVIDIA H100 80GB HBM3)" in text and "Timed with CUDA events" in text
    assert "| ops | of which views | kernels | kernels vs BN | kernels vs GN | memcpy/memset |" in text
    assert "| MABN | 2x8x4x4 | 10 | 2 | 9 | 3.00x | 1.50x | 0 |" in text
    assert "(30 rounds, CUDA events, 40 calls per sample)" in text
    assert "| 2x8x4x4 | MABN | 0.020 | 1.50x | 0.75x | 4.0 | 1% | 40 |" in text
    assert "| batch | variant | median ms | vs BN | vs GN |" in text
    assert "| 2 | MABN+CenConv | 30.0 | 1.04x | 0.61x |" in text
    assert "Dispatched operators only" not in text


def test_markdown_on_cpu_reports_dispatched_operators_only():
    text = bench.format_markdown(_results("cpu"))
    assert "Dispatched operators only: kernel launches exist only on CUDA" in text
    assert "kernels vs BN" not in text and "CUDA events" not in text
    assert "| shape | variant | median ms | vs BN | vs GN | copies | IQR |\n" in text   # no k column
    assert "| 2 | MABN+CenConv | 30.0 | 1.04x | 0.61x |" in text
