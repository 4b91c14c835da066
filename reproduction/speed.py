"""Inference speed of ResNet-50 with each norm, timed with the benchmarks' interleaved harness.

``python -m reproduction.speed --out speed.json [--batch 8 --resolution 64 --rounds 20 --warmup 3]``
times an eval-mode ``no_grad`` forward of torchvision's ResNet-50 with BN (as trained, and folded
into the convs), MABN (+ CenConv) folded into the convs (``mabn.fold_norms``), IN, GN, LN and no
norm, in rounds that run every variant once in a rotating order, and writes the medians, it/s,
the ratio to folded BN and every round's time (the claims compare folded MABN with folded BN
round by round). It prints ``speed: round i/n`` lines on stderr as it goes.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from benchmarks.bench import BN, GN, MABN_FOLDED, NO_NORM, build_resnet, machine_info
from benchmarks.harness import Case, interleaved_times, summarize
from mabn.utils.checkpoint import write_text_atomic

__all__ = ["BN_FOLDED", "VARIANTS", "PAPER_ITS", "build_variant", "measure", "main"]

IN, LN, BN_FOLDED = "IN", "LN", "BN folded"
VARIANTS = (BN, BN_FOLDED, MABN_FOLDED, IN, GN, LN, NO_NORM)
# The paper's inference speed of ResNet-50 on a GPU (it/s); MABN folds into the convs like BN.
PAPER_ITS = {BN: 237.88, MABN_FOLDED: 237.88, IN: 105.60, GN: 99.37, LN: 125.44}


def build_variant(variant: str, batch: int, base: nn.Module) -> nn.Module:
    """A copy of ``base`` (torchvision ResNet-50 with BN) with the norms of ``variant``, in eval mode."""
    from mabn import convert_norm, fold_norms

    if variant == BN_FOLDED:
        return fold_norms(base)
    if variant in (IN, LN):
        return convert_norm(copy.deepcopy(base), variant).eval()
    return build_resnet(variant, batch, base).eval()


def measure(batch: int, resolution: int, rounds: int, warmup: int, arch: str = "resnet50") -> Dict[str, object]:
    """Median seconds per forward, it/s, images/s, ratio to folded BN and round times for every variant."""
    import torchvision

    device = torch.device("cpu")
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(weights=None)
    images = torch.randn(batch, 3, resolution, resolution)
    models = {variant: build_variant(variant, batch, base) for variant in VARIANTS}
    cases = {variant: Case(run=torch.no_grad()(functools.partial(model, images))) for variant, model in models.items()}
    times = interleaved_times(cases, rounds, warmup, device, label="speed")
    rows: List[Dict[str, object]] = []
    for variant in VARIANTS:
        summary = summarize(times[variant])
        seconds = summary["median_ms"] / 1e3
        rows.append({"variant": variant, "median_ms": summary["median_ms"], "iqr_pct": summary["iqr_pct"],
                     "it_per_s": 1.0 / seconds, "images_per_s": batch / seconds,
                     "paper_it_per_s": PAPER_ITS.get(variant), "times_ms": summary["times_ms"]})
    reference = next(r["it_per_s"] for r in rows if r["variant"] == BN_FOLDED)
    for row in rows:
        row["ratio_to_bn_folded"] = row["it_per_s"] / reference
    return {"arch": arch, "batch": batch, "resolution": resolution, "rounds": rounds, "warmup": warmup,
            "threads": torch.get_num_threads(), "machine": machine_info(device), "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    args = parser.parse_args(argv)
    if min(args.batch, args.resolution, args.rounds) < 1 or args.warmup < 0 or args.resolution < 64:
        print("error: --batch and --rounds must be >= 1, --resolution >= 64, --warmup >= 0", file=sys.stderr)
        return 2
    result = measure(args.batch, args.resolution, args.rounds, args.warmup)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
