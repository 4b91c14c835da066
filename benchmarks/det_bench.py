"""One Mask R-CNN training step on CPU per norm: BN, GN, MABN and SyncBN over 2 gloo processes.

Usage (from the repository root)::

    python -m benchmarks.det_bench --quick               # tiny config only, about a minute
    python -m benchmarks.det_bench --json det.json       # tiny config, then R-50-FPN at 512 px

Models are built by ``det.modeling.build_detection_model`` from the repository's configs
(``configs/det/shapes/mask_rcnn_{norm}_tiny.yaml`` and
``configs/det/e2e_mask_rcnn_R_50_FPN_{norm}_2x_from_scratch.yaml`` with
``INPUT.MIN_SIZE_TRAIN (512,)``). The batch is synthetic: 2 random images (seeded) with a few
random boxes, labels and box-shaped masks each, in torchvision's target format. A step is
forward (all losses), backward and ``SGD(lr=0, momentum=0.9).step()``, in train mode; gradients
are zeroed untimed before it. Every variant runs two untimed steps (the memory measurements
below) before the warm-up rounds, so R-50 needs no warm-up round of its own.

The RPN runs in full (anchors, losses, NMS), but the box and mask heads get the same fixed
proposals in every variant (:func:`fixed_proposals`: shifted copies of the ground-truth boxes and
random boxes, as many per image as the RPN keeps in training), hence as many RoIs: an untrained
detector's own proposals depend on its weights, and so does the number of positive RoIs the mask
head processes, which would make the variants' steps differ in work that is not the norm's.

BN, GN and MABN run in this process with 2 images. SyncBN runs as the SyncBN-(1x2) setting:
2 spawned gloo processes, 1 image each, each with half of this process's threads, wrapped in
``mabn.utils.distributed.GradientAveraging`` as the det trainer does on CPU. Its steps are
interleaved with the others round by round (:func:`benchmarks.harness.interleaved_times`): the
timed call sends "step" to both workers and waits for both answers. A fifth variant,
``SyncBN no comm``, runs the same workers with every ``torch.distributed.all_reduce`` replaced by
a no-op (each rank then normalizes with its own statistics), so the difference of the two
medians is what communication costs. The workers also time their all-reduce calls (waiting for
the peer included).

Memory. ``saved MiB``: activation bytes autograd saves for backward in one step
(:class:`benchmarks.harness.SavedTensorBytes`, parameters and buffers excluded). ``peak MiB``: the
largest increase of the process's resident set size during one step over its size before the
step, sampled every millisecond from ``/proc/self/statm`` after ``malloc_trim`` (an estimate: allocator caching and
the sampling interval blur it). For SyncBN both are per process (1 image), summed over the 2.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from benchmarks.harness import Case, interleaved_times, log, paired_ratio, saved_bytes, summarize
from benchmarks.targets import Target, check, format_target
from mabn.utils.checkpoint import write_text_atomic
from mabn.utils.distributed import average_gradients

__all__ = ["DetConfig", "TINY", "R50", "synthetic_batch", "fixed_proposals", "build_step", "run_config", "evaluate_targets",
           "format_markdown", "main"]

MIB = 2.0 ** 20
BN, GN, MABN, SYNCBN, SYNCBN_NO_COMM = "BN", "GN", "MABN", "SyncBN 1x2", "SyncBN 1x2 no comm"
LOCAL_NORMS = {BN: "bn", GN: "gn", MABN: "mabn"}
IMAGES = 2
WORLD_SIZE = 2
TIME_LIMIT_BN, TIME_LIMIT_GN, MEMORY_LIMIT = 1.03, 1.0, 1.10
BOXES_PER_IMAGE = 3


@dataclass(frozen=True)
class DetConfig:
    """A detector setting: config file pattern (``{norm}`` is filled in), options, image size, rounds."""

    name: str
    config: str
    opts: Tuple[str, ...]
    height: int
    width: int
    rounds: int
    warmup: int

    def config_file(self, norm: str) -> str:
        return self.config.format(norm=norm)


TINY = DetConfig("tiny", "configs/det/shapes/mask_rcnn_{norm}_tiny.yaml", (), 128, 160, rounds=5, warmup=1)
R50 = DetConfig("R-50-FPN 512px", "configs/det/e2e_mask_rcnn_R_50_FPN_{norm}_2x_from_scratch.yaml",
                ("INPUT.MIN_SIZE_TRAIN", "(512,)", "INPUT.MAX_SIZE_TRAIN", "1024"), 512, 640, rounds=3, warmup=0)


def _repo_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)


def synthetic_batch(height: int, width: int, num_classes: int, seed: int = 0
                    ) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    """``IMAGES`` RGB images in [0, 1] and targets (boxes, labels, masks) as torchvision's MaskRCNN takes them."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(IMAGES):
        images.append(torch.rand(3, height, width, generator=generator))
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        size = (0.2 + 0.2 * torch.rand(BOXES_PER_IMAGE, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([corner, corner + size], dim=1).floor()
        masks = torch.zeros(BOXES_PER_IMAGE, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes, (BOXES_PER_IMAGE,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def fixed_proposals(image_sizes: Sequence[Tuple[int, int]], targets: Sequence[Dict[str, Tensor]], per_image: int,
                    seed: int = 0) -> List[Tensor]:
    """``per_image`` proposal boxes for each image, a function of the images' sizes and boxes and of
    ``seed`` only: half of them (at most) are copies of the ground-truth boxes shifted by up to 10%
    of their size (IoU above 0.5 with their box: positives), the rest are random boxes of 5-35% of
    the image side."""
    generator = torch.Generator().manual_seed(seed)
    proposals = []
    for (height, width), target in zip(image_sizes, targets):
        boxes = target["boxes"]
        copies = max(1, per_image // (2 * len(boxes))) if len(boxes) else 0
        near = boxes.repeat(copies, 1)
        extent = (near[:, 2:] - near[:, :2]).repeat(1, 2)
        near = near + (torch.rand(near.shape, generator=generator) - 0.5) * 0.2 * extent
        rest = max(0, per_image - len(near))
        side = torch.tensor([width, height], dtype=boxes.dtype)
        corner = torch.rand(rest, 2, generator=generator) * side * 0.65
        size = (0.05 + 0.3 * torch.rand(rest, 2, generator=generator)) * side
        every = torch.cat([near, torch.cat([corner, corner + size], dim=1)])[:per_image]
        limits = side.repeat(2)
        proposals.append(torch.minimum(every.clamp(min=0), limits).to(boxes.device))
    return proposals


def _with_fixed_proposals(model: nn.Module) -> None:
    """Replace the proposals of ``model``'s RPN, after it has run (anchors, losses, NMS), by
    :func:`fixed_proposals` for its inputs, as many per image as the RPN keeps at most in training.

    An untrained detector's proposals depend on its weights, so the number of positive RoIs (the
    mask head's batch) differs between norms: 7 against 9 for BN and MABN in one measurement,
    which moved the step time by a few percent that have nothing to do with the norm. With the
    same proposals every variant's heads get as many positive and negative RoIs (the sampler's
    random pick among them is the only difference, and a RoI's cost does not depend on its box)."""
    rpn = model.rpn
    top_n = rpn.post_nms_top_n()

    def replace(module: nn.Module, args: tuple, output: tuple) -> tuple:
        image_list, _, targets = args
        images = len(image_list.image_sizes)
        per_image = top_n // images if getattr(module, "per_batch_in_training", False) else top_n
        return fixed_proposals(image_list.image_sizes, targets, per_image), output[1]

    rpn.register_forward_hook(replace)


def build_step(config: DetConfig, norm: str, images: Sequence[Tensor], targets: Sequence[Dict[str, Tensor]],
               wrap: Optional[Callable[[nn.Module], nn.Module]] = None) -> Case:
    """A :class:`Case` running one training step of the ``norm`` detector (``wrap``-ped) on ``images``,
    with the RPN's proposals replaced by :func:`fixed_proposals` (:func:`_with_fixed_proposals`)."""
    from det.config import load_config
    from det.modeling import build_detection_model

    cfg = load_config(_repo_path(config.config_file(norm)), list(config.opts))
    torch.manual_seed(0)
    model = build_detection_model(cfg)
    model.train()
    _with_fixed_proposals(model)
    if wrap is not None:
        model = wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    state: dict = {}

    def run() -> None:
        losses = model(list(images), list(targets))
        total = sum(losses.values())
        total.backward()
        average_gradients(model)
        optimizer.step()
        state["loss"] = float(total.detach())

    params = list(model.parameters()) + list(model.buffers())
    return Case(run=run, prepare=lambda: optimizer.zero_grad(set_to_none=True), params=params, state=state)


def _release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``), so RSS starts low."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_increase(case: Case, interval_s: float = 1e-3) -> int:
    """Largest RSS increase (bytes) during one untimed ``case.run()``, sampled every ``interval_s``,
    after the allocator's free pages went back to the OS (else reused pages would not show)."""
    if case.prepare is not None:
        case.prepare()
    _release_free_memory()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        case.run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - before


# --- SyncBN workers -------------------------------------------------------------------------------

class _AllReduceMeter:
    """Replaces ``torch.distributed.all_reduce`` in a worker: times every call, or skips it (no comm)."""

    def __init__(self) -> None:
        self.original = dist.all_reduce
        self.communicate = True
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, tensor: Tensor, *args, **kwargs):
        self.calls += 1
        if not self.communicate:
            return None
        start = time.perf_counter()
        try:
            return self.original(tensor, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _sync_worker(rank: int, config: DetConfig, threads: int, init_file: str, connections) -> None:
    """One SyncBN rank: builds its model on image ``rank``, answers "step"/"step no comm"/"stop"."""
    from mabn.utils.distributed import GradientAveraging

    connection = connections[rank]
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        meter = _AllReduceMeter()
        # This worker process only: SyncBN and GradientAveraging look the function up on the module.
        dist.all_reduce = meter
        images, targets = _batch_for(config, "syncbn")
        case = build_step(config, "syncbn", images[rank:rank + 1], targets[rank:rank + 1],
                          wrap=lambda model: GradientAveraging(model, WORLD_SIZE))
        saved = saved_bytes(case)
        peak = peak_rss_increase(case)
        connection.send({"saved_bytes": saved, "peak_bytes": peak})
        while True:
            command = connection.recv()
            if command == "stop":
                break
            meter.communicate = command == "step"
            meter.seconds, meter.calls = 0.0, 0
            case.prepare()
            start = time.perf_counter()
            case.run()
            connection.send({"seconds": time.perf_counter() - start, "all_reduce_s": meter.seconds,
                             "all_reduce_calls": meter.calls, "loss": case.state["loss"]})
        dist.barrier()
    finally:
        dist.destroy_process_group()


class SyncWorkers:
    """Two spawned SyncBN ranks driven from this process; ``case(communicate)`` times one step of both."""

    def __init__(self, config: DetConfig, threads: int) -> None:
        context = mp.get_context("spawn")
        pipes = [context.Pipe() for _ in range(WORLD_SIZE)]
        self._connections = [ours for ours, _ in pipes]
        self._directory = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._directory.name, "init")
        self._context = mp.start_processes(_sync_worker, args=(config, threads, init_file, [w for _, w in pipes]),
                                           nprocs=WORLD_SIZE, join=False, start_method="spawn")
        ready = [self._receive(connection) for connection in self._connections]
        self.saved_bytes = sum(answer["saved_bytes"] for answer in ready)
        self.peak_bytes = sum(answer["peak_bytes"] for answer in ready)
        self.steps: Dict[bool, List[dict]] = {True: [], False: []}

    def _receive(self, connection) -> dict:
        while not connection.poll(1.0):
            if not all(process.is_alive() for process in self._context.processes):
                self._context.join()  # raises the worker's exception
                raise RuntimeError("a SyncBN worker exited early")
        return connection.recv()

    def case(self, communicate: bool) -> Case:
        command = "step" if communicate else "step no comm"

        def run() -> None:
            for connection in self._connections:
                connection.send(command)
            answers = [self._receive(connection) for connection in self._connections]
            self.steps[communicate].append({
                "seconds": max(a["seconds"] for a in answers),
                "all_reduce_s": max(a["all_reduce_s"] for a in answers),
                "all_reduce_calls": answers[0]["all_reduce_calls"]})
        return Case(run=run)

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send("stop")
        self._context.join(timeout=60)
        self._directory.cleanup()


# --- measurement ----------------------------------------------------------------------------------

def _batch_for(config: DetConfig, norm: str) -> Tuple[List[Tensor], List[Dict[str, Tensor]]]:
    from det.config import load_config

    cfg = load_config(_repo_path(config.config_file(norm)), list(config.opts))
    return synthetic_batch(config.height, config.width, cfg.MODEL.ROI_BOX_HEAD.NUM_CLASSES)


def run_config(config: DetConfig, threads: int, with_syncbn: bool) -> Dict[str, object]:
    """Times, ratios and memory of every variant on ``config``, all in the same interleaved rounds."""
    log(f"{config.name}: building BN, GN, MABN")
    images, targets = _batch_for(config, "bn")
    cases = {name: build_step(config, norm, images, targets) for name, norm in LOCAL_NORMS.items()}
    memory = {}
    for name, case in cases.items():
        memory[name] = {"saved_bytes": saved_bytes(case), "peak_bytes": peak_rss_increase(case)}
    workers = None
    try:
        if with_syncbn:
            log(f"{config.name}: starting 2 SyncBN processes ({max(1, threads // WORLD_SIZE)} thread(s) each)")
            workers = SyncWorkers(config, max(1, threads // WORLD_SIZE))
            cases[SYNCBN] = workers.case(True)
            cases[SYNCBN_NO_COMM] = workers.case(False)
            memory[SYNCBN] = {"saved_bytes": workers.saved_bytes, "peak_bytes": workers.peak_bytes}
        times = interleaved_times(cases, config.rounds, config.warmup, torch.device("cpu"), label=config.name)
    finally:
        if workers is not None:
            workers.close()
    medians = {name: summarize(seconds) for name, seconds in times.items()}
    rows = []
    for name, summary in medians.items():
        row = {"variant": name, **summary,
               "ratio_to_bn": paired_ratio(times[name], times[BN]),
               "ratio_to_gn": paired_ratio(times[name], times[GN]),
               "ratio_to_mabn": paired_ratio(times[name], times[MABN])}
        if name in memory:
            row["saved_mib"] = memory[name]["saved_bytes"] / MIB
            row["peak_rss_mib"] = memory[name]["peak_bytes"] / MIB
        if name in LOCAL_NORMS:
            row["loss_finite"] = bool(torch.isfinite(torch.tensor(cases[name].state["loss"])))
        rows.append(row)
    result: Dict[str, object] = {"config": config.name, "rounds": config.rounds, "warmup": config.warmup,
                                 "image_size": [config.height, config.width], "rows": rows}
    if workers is not None:
        result["syncbn_threads_per_process"] = max(1, threads // WORLD_SIZE)
        timed = {flag: steps[config.warmup:] for flag, steps in workers.steps.items()}
        all_reduce_ms = sorted(1e3 * step["all_reduce_s"] for step in timed[True])
        result["syncbn"] = {
            "comm_cost_ms": medians[SYNCBN]["median_ms"] - medians[SYNCBN_NO_COMM]["median_ms"],
            "all_reduce_median_ms": all_reduce_ms[len(all_reduce_ms) // 2],
            "all_reduce_calls_per_step": timed[True][0]["all_reduce_calls"],
            "vs_mabn": paired_ratio(times[SYNCBN], times[MABN]),
            "no_comm_vs_mabn": paired_ratio(times[SYNCBN_NO_COMM], times[MABN])}
    return result


def evaluate_targets(result: Dict[str, object]) -> List[Target]:
    """The three targets on one config: MABN step time vs BN and GN, MABN saved memory vs BN."""
    rows = {row["variant"]: row for row in result["rows"]}
    name = result["config"]
    return [
        check(f"{name} train step MABN / BN", rows[MABN]["ratio_to_bn"], "<=", TIME_LIMIT_BN),
        check(f"{name} train step MABN / GN", rows[MABN]["ratio_to_gn"], "<=", TIME_LIMIT_GN),
        check(f"{name} saved for backward MABN / BN", rows[MABN]["saved_mib"] / rows[BN]["saved_mib"], "<=",
              MEMORY_LIMIT),
    ]


def format_markdown(result: Dict[str, object]) -> str:
    """One table per config, and the SyncBN communication line."""
    lines = [f"### {result['config']} ({result['image_size'][0]}x{result['image_size'][1]} input, "
             f"{result['rounds']} timed rounds)", "",
             "| variant | median ms | spread % | / BN | / GN | / MABN | saved MiB | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        saved = f"{row['saved_mib']:.1f}" if "saved_mib" in row else "-"
        peak = f"{row['peak_rss_mib']:.1f}" if "peak_rss_mib" in row else "-"
        lines.append(f"| {row['variant']} | {row['median_ms']:.0f} | {row['iqr_pct']:.0f} | {row['ratio_to_bn']:.3f}x "
                     f"| {row['ratio_to_gn']:.3f}x | {row['ratio_to_mabn']:.3f}x | {saved} | {peak} |")
    sync = result.get("syncbn")
    if sync:
        lines += ["", f"SyncBN 1x2 (2 gloo processes x 1 image, {result['syncbn_threads_per_process']} thread(s) each, "
                  f"interleaved in the same rounds) / MABN: {sync['vs_mabn']:.3f}x "
                  f"(without communication {sync['no_comm_vs_mabn']:.3f}x); "
                  f"communication {sync['comm_cost_ms']:.0f} ms per step (difference of medians), "
                  f"{sync['all_reduce_median_ms']:.0f} ms inside {sync['all_reduce_calls_per_step']} all-reduce calls "
                  f"(median, slower rank, waiting included); MABN needs none."]
    return "\n".join(lines)


def _machine(threads: int) -> Dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg())}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config only, few rounds (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file (atomically)")
    parser.add_argument("--rounds", type=int, help="timed rounds per config (default: 5 tiny, 3 R-50; --quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: 1 tiny, 0 R-50)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads here; each SyncBN process gets half (default: torch's)")
    parser.add_argument("--no-syncbn", action="store_true", help="skip the 2-process SyncBN variants")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.exit(2, f"error: --rounds {args.rounds} must be at least 1\n")
    if args.warmup is not None and args.warmup < 0:
        parser.exit(2, f"error: --warmup {args.warmup} must be 0 or more\n")
    if args.threads < 1:
        parser.exit(2, f"error: --threads {args.threads} must be at least 1\n")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.exit(2, f"error: --json {args.json}: its folder does not exist; create it or pick another path\n")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    configs = [TINY] if args.quick else [TINY, R50]
    results = {"machine": _machine(args.threads), "quick": args.quick, "configs": [], "targets": []}
    for config in configs:
        rounds = args.rounds or (3 if args.quick else config.rounds)
        warmup = config.warmup if args.warmup is None else args.warmup
        config = DetConfig(config.name, config.config, config.opts, config.height, config.width, rounds, warmup)
        result = run_config(config, args.threads, not args.no_syncbn)
        results["configs"].append(result)
        targets = evaluate_targets(result)
        results["targets"] += [target.as_dict() for target in targets]
        print(format_markdown(result), end="\n\n", flush=True)
        for target in targets:
            print(format_target(target), flush=True)
        print(flush=True)
    results["elapsed_s"] = time.perf_counter() - started
    print(f"threads {args.threads}, load average at start {results['machine']['load_average_at_start'][0]:.2f}, "
          f"{results['elapsed_s']:.0f} s; peak RSS is sampled every 1 ms (an estimate), saved is exact", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
