"""det.engine.trainer and det.engine.checkpoint on a toy model: checkpoints and last_checkpoint,
NaN/Inf handling, stop requests, the log line, the resume policy for changed config keys; the
loader workers that the trainer stops."""
from __future__ import annotations

import hashlib
import math
import os
from typing import List

import pytest
import torch
from torch import nn

from det.config import load_config
from det.engine.checkpoint import (LAST_CHECKPOINT, CheckpointWriter, compare_configs, find_last_checkpoint,
                                   read_checkpoint, restore_training_state)
from det.engine.metric_logger import MetricLogger
from det.engine.trainer import DetectionTrainer, PeriodicCheckpoint, build_hooks, precision_from_dtype
from det.solver import make_lr_scheduler, make_optimizer
from mabn.utils.distributed import DistEnv
from mabn.utils.errors import NonFiniteLossError, NonFiniteStateError, UserError


class Toy(nn.Module):
    """Returns a loss dict like torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.norm = nn.BatchNorm2d(2)

    def forward(self, images, targets):
        out = self.norm(self.conv(torch.stack(images)))
        return {"loss_a": out.square().mean(), "loss_b": out.abs().mean()}


class Lines:
    def __init__(self):
        self.lines: List[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    warning = info

    def scalars(self, values, step) -> None:
        pass

    def progress(self, total, initial=0, desc=""):
        return None


def _batches(count: int, bad_at: int = -1):
    batches = []
    for i in range(count):
        image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i))
        if i == bad_at:
            image[0, 0, 0] = math.nan
        batches.append(([image, image.flip(-1)], [{}, {}], [2 * i, 2 * i + 1]))
    return batches


def _setup(tmp_path, batches, period: int = 1, *opts: str):
    cfg = load_config(None, ["SOLVER.BASE_LR", "0.01", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "0", *opts])
    torch.manual_seed(0)
    model = Toy()
    optimizer = make_optimizer(cfg, model)
    scheduler = make_lr_scheduler(cfg, optimizer)
    env, log = DistEnv(), Lines()
    trainer = DetectionTrainer(model, optimizer, batches, env, precision_from_dtype("float32", env.device))
    writer = CheckpointWriter(str(tmp_path), model, optimizer, scheduler, None, env, cfg.dump(), log)
    saver = PeriodicCheckpoint(writer, trainer, period)
    trainer.register_hooks(build_hooks(trainer, scheduler, log, saver, None, 0))
    return cfg, trainer, writer, log


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_checkpoints_every_period_and_final_with_last_checkpoint(tmp_path):
    _, trainer, _, log = _setup(tmp_path, _batches(4), 2)
    assert trainer.train(0, 4)
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".pth")) == [
        "model_0000002.pth", "model_0000004.pth", "model_final.pth"]
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_final.pth")
    checkpoint = read_checkpoint(str(tmp_path / "model_0000002.pth"))
    assert checkpoint["iteration"] == 2 and checkpoint["world_size"] == 1
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "iteration", "config", "rank_states"}
    assert checkpoint["scheduler"]["last_epoch"] == 2
    line = [l for l in log.lines if l.startswith("eta:")][-1]
    assert line.startswith("eta: 0:00:00  iter: 4  loss: ") and "loss_a: " in line and "lr: 0.001000" in line
    assert "time: " in line and "data: " in line and "max mem: " in line


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    _, trainer, writer, _ = _setup(tmp_path, _batches(4, bad_at=2))
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        trainer.train(0, 4)
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000002.pth")
    assert not (tmp_path / "model_0000003.pth").exists()
    assert "model_0000002.pth was kept" in writer.kept()
    assert torch.isfinite(trainer.model.conv.weight).all()


def _record_host_syncs(trainer: DetectionTrainer, step_events) -> List[str]:
    """Events of the trainer's steps in order: ``forward`` (the model returned), every host sync on
    a tensor derived from the losses (its method name), ``backward`` (the backward starts) and
    ``step`` (the optimizer step)."""
    model, precision = trainer.model, trainer.precision
    forward = model.forward

    def recorded_forward(images, targets):
        losses = {name: step_events.track(loss) for name, loss in forward(images, targets).items()}
        step_events.events.append("forward")
        return losses

    model.forward = recorded_forward
    precision.backward = step_events.named("backward", precision.backward)
    precision.step = step_events.named("step", precision.step)
    return step_events.events


def test_no_host_sync_between_forward_and_backward(tmp_path, step_events):
    _, trainer, _, _ = _setup(tmp_path, _batches(2))
    events = _record_host_syncs(trainer, step_events)
    trainer.train(0, 2)
    first = events[:events.index("step") + 1]
    assert first[:2] == ["forward", "backward"], first
    assert first[2:] == ["tolist", "step"], first  # one transfer per step: the all-reduced summary
    assert events == first * 2
    assert set(trainer.losses) == {"loss", "loss_a", "loss_b"}
    assert all(math.isfinite(value) for value in trainer.losses.values())


def test_a_non_finite_loss_raises_without_an_optimizer_step(tmp_path, step_events):
    _, trainer, _, _ = _setup(tmp_path, _batches(1, bad_at=0))
    events = _record_host_syncs(trainer, step_events)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"iteration 1 \(on rank 0: loss_a nan, loss_b nan; "
                                                 r"non-finite on 1 of 1 processes\)"):
        trainer.train(0, 1)
    assert events[:3] == ["forward", "backward", "tolist"] and "step" not in events
    assert trainer.model.conv.weight.grad is not None  # the backward ran, the update did not
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert not trainer.optimizer.state
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".pth")]


def test_a_non_finite_state_is_never_written(tmp_path):
    _, trainer, writer, _ = _setup(tmp_path, _batches(2))
    trainer.train(0, 1)
    good, last = _digest(tmp_path / "model_0000001.pth"), find_last_checkpoint(str(tmp_path))
    with torch.no_grad():
        trainer.model.conv.weight[0, 0, 0, 0] = math.inf
    with pytest.raises(NonFiniteStateError, match="conv.weight"):
        writer("model_0000002", 2)
    assert _digest(tmp_path / "model_0000001.pth") == good and find_last_checkpoint(str(tmp_path)) == last
    assert not (tmp_path / "model_0000002.pth").exists()


def test_a_stop_request_saves_where_it_stopped(tmp_path):
    _, trainer, _, _ = _setup(tmp_path, _batches(5), 100)
    trainer.register_hooks([])
    trainer.stop_flag.request("SIGTERM")
    assert not trainer.train(0, 5)
    assert trainer.iter == 1 and find_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000001.pth")


def test_resuming_continues_the_same_run(tmp_path):
    batches = _batches(4)
    _, straight, _, _ = _setup(tmp_path / "a", batches, 2)
    straight.train(0, 4)
    cfg, first, _, _ = _setup(tmp_path / "b", batches[:2], 2)
    first.train(0, 2)
    path = find_last_checkpoint(str(tmp_path / "b"))
    cfg, second, _, _ = _setup(tmp_path / "b", batches[2:], 2)
    start = restore_training_state(read_checkpoint(path), path, cfg, second.model, second.optimizer,
                                   second.hooks[1].scheduler, None)
    assert start == 2 and second.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    second.train(start, 4)
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_resume_applies_schedule_changes_and_refuses_model_changes():
    saved = load_config(None, ["SOLVER.BASE_LR", "0.01"])
    lines = compare_configs(saved.dump(), load_config(None, ["SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", "9"]),
                            "ckpt", 1, 1)
    assert lines == ["changed since the checkpoint: SOLVER.BASE_LR 0.01 -> 0.02 (applied)",
                     "changed since the checkpoint: SOLVER.MAX_ITER 40000 -> 9 (applied)"]
    with pytest.raises(UserError, match=r"MODEL.MABN.B 2 \(now 4\), SOLVER.IMS_PER_BATCH 16 \(now 8\)") as error:
        compare_configs(saved.dump(), load_config(None, ["MODEL.MABN.B", "4", "SOLVER.IMS_PER_BATCH", "8"]),
                        "ckpt", 1, 1)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"SEED 0 \(now 3\)"):
        compare_configs(saved.dump(), load_config(None, ["SEED", "3"]), "ckpt", 1, 1)
    with pytest.raises(UserError, match=r"world size 2 \(now 1\)"):
        compare_configs(saved.dump(), saved, "ckpt", 2, 1)


def test_last_checkpoint_naming_a_missing_file_is_an_error(tmp_path):
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000009.pth\n")
    with pytest.raises(UserError, match="model_0000009.pth"):
        find_last_checkpoint(str(tmp_path))
    assert find_last_checkpoint(str(tmp_path / "nothing")) is None


def test_meters_print_median_and_global_average():
    meters = MetricLogger()
    for value in (1.0, 2.0, 6.0):
        meters.update(loss=value, time=2.0)
    assert str(meters) == "loss: 2.0000 (3.0000)  time: 2.0000 (2.0000)"
    assert meters.line(3, 5, 0.02, 12.4).startswith("eta: 0:00:04  iter: 3  loss: 2.0000 (3.0000)")


def test_bad_dtype_is_one_line():
    with pytest.raises(UserError, match="DTYPE 'float64'"):
        precision_from_dtype("float64", torch.device("cpu"))

