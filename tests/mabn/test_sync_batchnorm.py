"""Tests for mabn.sync_batchnorm (CPU only; the distributed part uses 2 gloo processes)."""
from __future__ import annotations

import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mabn.convert import convert_sync_batchnorm, revert_sync_batchnorm
from mabn.sync_batchnorm import SyncBatchNorm

DIST_OK = dist.is_available() and dist.is_gloo_available()


def _set_params(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.num_features
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)


def _pair(ref_cls, c, dtype=torch.float64, **kw):
    ref = ref_cls(c, dtype=dtype, **kw)
    ours = SyncBatchNorm(c, dtype=dtype, **kw)
    _set_params(ref, 0)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_same_state(ref: nn.Module, ours: nn.Module, skipped: int = 0, **tol) -> None:
    """torch's state plus our ``skipped_updates`` counter (when running statistics are tracked)."""
    expected, got = ref.state_dict(), dict(ours.state_dict())
    if "running_mean" in expected:
        assert got.pop("skipped_updates").item() == skipped
    assert list(got) == list(expected)
    for k, a in expected.items():
        torch.testing.assert_close(got[k], a, **tol, msg=k)


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize(
    "ref_cls,shape,momentum",
    [
        (nn.BatchNorm1d, (6, 3), 0.1),
        (nn.BatchNorm1d, (5, 3, 7), None),
        (nn.BatchNorm2d, (4, 3, 5, 6), 0.1),
        (nn.BatchNorm3d, (3, 3, 2, 4, 3), None),
    ],
)
def test_single_process_matches_batchnorm(ref_cls, shape, momentum):
    assert not (dist.is_available() and dist.is_initialized())
    ref, ours = _pair(ref_cls, shape[1], momentum=momentum)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
        gy = torch.randn(shape, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        xo = x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        torch.testing.assert_close(yo, yr)
        (yr * gy).sum().backward()
        (yo * gy).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
        _assert_same_state(ref, ours)
    ref.eval()
    ours.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    _assert_same_state(ref, ours)


def test_single_process_no_running_stats_and_half_inputs():
    ref, ours = _pair(nn.BatchNorm2d, 4, track_running_stats=False)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    for m in (ref, ours):
        m.eval()  # no buffers -> batch statistics even in eval mode
    torch.testing.assert_close(ours(x), ref(x))

    for dtype in (torch.bfloat16, torch.float16):
        ref, ours = _pair(nn.BatchNorm2d, 4, dtype=torch.float32)
        x = torch.randn(5, 4, 3, 3).to(dtype)
        yo, yr = ours(x), ref(x)
        assert yo.dtype == dtype
        torch.testing.assert_close(yo.float(), yr.float(), atol=2e-2, rtol=2e-2)
        _assert_same_state(ref, ours, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not DIST_OK, reason="gloo not available")
def test_world_size_one_behaves_like_batchnorm(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path / "store1"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ref, ours = _pair(nn.BatchNorm2d, 3)
        x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(ours(x), ref(x))
        _assert_same_state(ref, ours)
    finally:
        dist.destroy_process_group()


def test_input_checks():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError):
        bn(torch.randn(3))
    with pytest.raises(ValueError):
        bn(torch.randn(1, 3))  # one value per channel in training, like nn.BatchNorm


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_statistics_are_skipped_and_counted(bad, momentum):
    ref, ours = _pair(nn.BatchNorm2d, 3, dtype=torch.float32, momentum=momentum)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad  # 1e30: finite input, but its square (the variance) overflows float32
    ours(x)
    state = ours.state_dict()
    assert state["skipped_updates"].item() == 1 and state["skipped_updates"].dtype == torch.long
    assert state["skipped_updates"].shape == ()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(state[k], start[k]), k
    # a finite step afterwards updates exactly like BatchNorm does on that step alone
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))
    _assert_same_state(ref, ours, skipped=1)
    ours.reset_running_stats()
    assert ours.skipped_updates.item() == 0


def test_state_dicts_without_counter_load_strictly():
    ours = SyncBatchNorm(3)
    ours.skipped_updates.fill_(5)
    for source in (nn.BatchNorm2d(3), nn.SyncBatchNorm(3)):
        ours.load_state_dict(source.state_dict(), strict=True)
        assert ours.skipped_updates.item() == 0
    ours.skipped_updates.fill_(2)
    again = SyncBatchNorm(3)
    again.load_state_dict(ours.state_dict(), strict=True)
    assert again.skipped_updates.item() == 2
    assert "skipped_updates" not in SyncBatchNorm(3, track_running_stats=False).state_dict()


# --------------------------------------------------------------------------- conversion


def _model():
    m = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm3d(5, affine=False)),
        nn.BatchNorm2d(2, momentum=None, bias=False),
        nn.SyncBatchNorm(6, eps=1e-3),
    )
    for i, bn in enumerate(x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)):
        _set_params(bn, 10 + i)
        bn.num_batches_tracked.fill_(i + 1)
    m[1][1].weight.requires_grad_(False)
    m[1][2].eval()
    return m


def test_convert_revert_round_trip():
    orig = _model()
    ref_state = {k: v.clone() for k, v in orig.state_dict().items()}
    params = {n: p for n, p in orig.named_parameters()}
    kinds = [type(x) for x in orig.modules()]
    flags = [x.training for x in orig.modules()]
    rg = {n: p.requires_grad for n, p in orig.named_parameters()}

    conv = convert_sync_batchnorm(orig, process_group=None)
    bns = [x for x in conv.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5 and all(type(x) is SyncBatchNorm for x in bns)
    assert [x.training for x in conv.modules()] == flags
    for n, p in conv.named_parameters():  # same Parameter objects, requires_grad kept
        assert p is params[n] and p.requires_grad == rg[n]
    assert conv[2].bias is None and conv[2].momentum is None and conv[3].eps == 1e-3
    assert conv[1][2].weight is None
    for k, v in conv.state_dict().items():
        assert torch.equal(v, ref_state[k]) if not k.endswith("skipped_updates") else v.item() == 0, k
    # already ours: kept as is
    assert convert_sync_batchnorm(conv[0]) is conv[0]
    assert convert_sync_batchnorm(conv) is conv

    back = revert_sync_batchnorm(conv)  # dim=2 by default
    assert [type(x) for x in back.modules()] == [
        nn.BatchNorm2d if issubclass(k, nn.modules.batchnorm._BatchNorm) else k for k in kinds]
    assert [x.training for x in back.modules()] == flags
    for n, p in back.named_parameters():
        assert p is params[n] and p.requires_grad == rg[n]
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k]), k

    again = revert_sync_batchnorm(convert_sync_batchnorm(_model()), dim=3)
    assert all(
        type(x) is nn.BatchNorm3d
        for x in again.modules()
        if isinstance(x, nn.modules.batchnorm._BatchNorm)
    )
    with pytest.raises(ValueError):
        revert_sync_batchnorm(conv, dim=4)

    # top-level batch norm: a new module is returned
    top = nn.BatchNorm1d(3)
    new = convert_sync_batchnorm(top)
    assert type(new) is SyncBatchNorm and new.weight is top.weight
    assert type(revert_sync_batchnorm(new, dim=1)) is nn.BatchNorm1d


# --------------------------------------------------------------------------- 2 gloo processes

WORLD = 2
# (name, reference class, per-sample shape, momentum, per-step split [rank0, rank1] sizes)
CASES = [
    ("bn2d", nn.BatchNorm2d, (3, 4, 5), 0.1, [(3, 5), (5, 3)]),
    ("bn1d_cma", nn.BatchNorm1d, (4, 6), None, [(4, 2), (1, 5)]),
    ("bn1d_2d", nn.BatchNorm1d, (5,), 0.3, [(1, 3), (2, 2)]),
    ("bn3d_empty_rank", nn.BatchNorm3d, (2, 3, 2, 2), 0.1, [(0, 4), (3, 0)]),
]


def _case_data():
    g = torch.Generator().manual_seed(1234)
    data = {}
    for name, ref_cls, feat, momentum, splits in CASES:
        steps = []
        for split in splits:
            n = sum(split)
            x = torch.randn((n,) + feat, generator=g, dtype=torch.float64) * 2 + 5
            gy = torch.randn((n,) + feat, generator=g, dtype=torch.float64)
            steps.append((x, gy, split))
        data[name] = steps
    return data


def _worker(rank, tmp, init_method):
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        data = torch.load(os.path.join(tmp, "data.pt"))
        results = {}
        for name, ref_cls, feat, momentum, splits in CASES:
            bn = SyncBatchNorm(feat[0], momentum=momentum, dtype=torch.float64)
            _set_params(bn, 0)
            out = []
            for x, gy, split in data[name]:
                lo = sum(split[:rank])
                hi = lo + split[rank]
                xl = x[lo:hi].clone().requires_grad_()
                y = bn(xl)
                bn.weight.grad = None
                bn.bias.grad = None
                (y * gy[lo:hi]).sum().backward()
                out.append(
                    {
                        "y": y.detach(),
                        "gx": xl.grad,
                        "gw": bn.weight.grad.clone(),
                        "gb": bn.bias.grad.clone(),
                    }
                )
            results[name] = {"steps": out, "state": bn.state_dict()}
            bn.eval()  # eval: no sync, running statistics
            x = data[name][0][0]
            results[name]["eval"] = bn(x)

        # bf16 input, float32 module: statistics in float32, output in bf16
        bn = SyncBatchNorm(3)
        x = data["bn2d"][0][0][:, :3].float()
        half = x[: 4] if rank == 0 else x[4:]
        results["bf16"] = bn(half.to(torch.bfloat16))

        # float32 with |mean| >> std: the two-pass variance keeps full accuracy
        bn = SyncBatchNorm(3)
        x = data["bn2d"][0][0][:, :3]
        x32 = (x - 5 + 1e4).float()
        results["offset"] = bn(x32[:3] if rank == 0 else x32[3:]).detach()
        results["offset_var"] = bn.running_var.clone()

        # a NaN on rank 0 only: the global statistics are NaN, so both ranks skip the update
        bn = SyncBatchNorm(3, dtype=torch.float64)
        _set_params(bn, 0)
        x = torch.randn(3, 3, 2, dtype=torch.float64)
        if rank == 0:
            x[0, 1, 0] = float("nan")
        bn(x)
        results["nan_state"] = bn.state_dict()

        # empty global batch: empty output and gradient, every buffer unchanged
        bn = SyncBatchNorm(3, momentum=None, dtype=torch.float64)
        _set_params(bn, 0)
        x = torch.randn(0, 3, 2, dtype=torch.float64, requires_grad=True)
        bn(x).sum().backward()
        results["empty_state"] = bn.state_dict()
        results["empty_grad"] = x.grad

        # global batch of one value per channel: every rank raises, nobody hangs
        bn = SyncBatchNorm(3, dtype=torch.float64)
        x = torch.randn(1 - rank, 3, dtype=torch.float64)
        try:
            bn(x)
            results["one_value"] = "no error"
        except ValueError as e:
            results["one_value"] = str(e)
        dist.barrier()
        torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_workers(tmp_path, timeout=120.0):
    init_method = "file://" + str(tmp_path / "init_store")
    ctx = mp.spawn(_worker, args=(str(tmp_path), init_method), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError("distributed workers did not finish (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


@pytest.mark.skipif(not DIST_OK, reason="gloo not available")
def test_two_gloo_processes_match_global_batchnorm(tmp_path):
    data = _case_data()
    torch.save(data, tmp_path / "data.pt")
    _run_workers(tmp_path)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for name, ref_cls, feat, momentum, splits in CASES:
        ref = ref_cls(feat[0], momentum=momentum, dtype=torch.float64)
        _set_params(ref, 0)
        for step, (x, gy, split) in enumerate(data[name]):
            xr = x.clone().requires_grad_()
            ref.weight.grad = None
            ref.bias.grad = None
            yr = ref(xr)
            (yr * gy).sum().backward()
            got = [res[r][name]["steps"][step] for r in range(WORLD)]
            msg = f"{name} step {step}"
            torch.testing.assert_close(torch.cat([g["y"] for g in got]), yr.detach(), msg=msg)
            torch.testing.assert_close(torch.cat([g["gx"] for g in got]), xr.grad, msg=msg)
            # DDP would average; the plain sum over ranks is the global-batch gradient
            torch.testing.assert_close(sum(g["gw"] for g in got), ref.weight.grad, msg=msg)
            torch.testing.assert_close(sum(g["gb"] for g in got), ref.bias.grad, msg=msg)
        for r in range(WORLD):
            _assert_same_state(ref, _StateHolder(res[r][name]["state"]))
        ref.eval()
        for r in range(WORLD):
            torch.testing.assert_close(res[r][name]["eval"], ref(data[name][0][0]))

    ref = nn.BatchNorm2d(3)
    x = data["bn2d"][0][0][:, :3].float()
    yr = ref(x.to(torch.bfloat16))
    y = torch.cat([res[0]["bf16"], res[1]["bf16"]])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yr.float(), atol=3e-2, rtol=3e-2)

    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    yr = ref(data["bn2d"][0][0][:, :3] - 5 + 1e4)
    y = torch.cat([res[0]["offset"], res[1]["offset"]])
    torch.testing.assert_close(y.double(), yr.detach(), atol=2e-3, rtol=0)
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["offset_var"].double(), ref.running_var, atol=1e-3, rtol=1e-3)

    for r in range(WORLD):
        assert "more than 1 value per channel" in res[r]["one_value"]

    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    _set_params(ref, 0)
    for r in range(WORLD):
        _assert_same_state(ref, _StateHolder(res[r]["nan_state"]), skipped=1)

    ref = nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    _set_params(ref, 0)  # never run: the empty global batch changes nothing
    for r in range(WORLD):
        _assert_same_state(ref, _StateHolder(res[r]["empty_state"]))
        assert res[r]["empty_grad"].shape == (0, 3, 2)


class _StateHolder:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return self._state
