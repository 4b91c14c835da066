"""mabn.utils.checkpoint: atomic, finite-only writes; weights-only reads; type checks; RNG states."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from mabn.utils.checkpoint import (check_fields, first_non_finite, load_checkpoint, load_model_state, rank_buffers,
                                   capture_rng_state, load_rank_buffers, resolve_checkpoint_path, restore_rng_state,
                                   save_atomic, save_checkpoint, strip_module_prefix)
from mabn.utils.errors import NonFiniteStateError, UserError


def test_save_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "c.pth"
    save_atomic({"a": torch.ones(2)}, str(path))
    save_atomic({"a": torch.zeros(2)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(path.parent) == ["c.pth"]


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pth"
    save_atomic({"a": 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_atomic({"a": lambda: 0}, str(path))  # a lambda cannot be pickled
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pth"]


def test_first_non_finite_names_the_path():
    state = {"model": {"w": torch.ones(3), "n": torch.tensor(5)},
             "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([1.0, float("inf")])}}}, "lr": 0.1}
    assert first_non_finite(state) == "optimizer/state/0/momentum_buffer"
    assert first_non_finite({"meter": [1.0, float("nan")]}) == "meter/1"
    assert first_non_finite({"model": {"w": torch.ones(3)}, "k": "nan", "i": 3}) is None


def test_save_checkpoint_refuses_non_finite_state_and_keeps_the_last_good_file(tmp_path):
    path = tmp_path / "c.pth"
    with pytest.raises(NonFiniteStateError, match="model/b.*no checkpoint was written"):
        save_checkpoint({"model": {"b": torch.tensor(float("nan"))}}, str(path))
    assert not path.exists()
    save_checkpoint({"model": {"b": torch.tensor(1.0)}}, str(path))
    before = path.read_bytes()
    with pytest.raises(NonFiniteStateError, match="last good checkpoint .* was kept"):
        save_checkpoint({"model": {"b": torch.tensor(float("-inf"))}}, str(path))
    assert path.read_bytes() == before


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_load_checkpoint_never_runs_code_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Marker(marker)}, path)
    with pytest.raises(UserError, match="--trust_checkpoint") as info:
        load_checkpoint(str(path), trust_hint="--trust_checkpoint")  # the app's opt-in flag is named
    assert "\n" not in str(info.value) and not marker.exists()
    with pytest.raises(UserError, match="save its tensors as a state dict"):
        load_checkpoint(str(path))  # an app without such a flag: no flag is named
    assert not marker.exists()
    load_checkpoint(str(path), trusted=True)  # the documented opt-in does unpickle
    assert marker.exists()


def test_load_checkpoint_bad_files_and_bare_state_dicts(tmp_path):
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"\x89PNG not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(str(garbage))
    bare = tmp_path / "bare.pth"
    torch.save({"w": torch.ones(1)}, bare)
    assert set(load_checkpoint(str(bare))) == {"model"}
    other = tmp_path / "other.pth"
    torch.save({"weights": 1}, other)
    with pytest.raises(UserError, match="no 'model' entry"):
        load_checkpoint(str(other))
    with pytest.raises(UserError, match="--weights .*: no such checkpoint file"):
        resolve_checkpoint_path(str(tmp_path), "--weights")


def test_check_fields():
    fields = {"epoch": int, "scaler": (dict, type(None))}
    check_fields({"epoch": 3, "scaler": None, "other": "x"}, fields, "c.pth")
    check_fields({}, fields, "c.pth")  # absent fields are allowed
    with pytest.raises(UserError, match="field 'epoch' is str"):
        check_fields({"epoch": "3"}, fields, "c.pth")
    with pytest.raises(UserError, match="field 'epoch' is bool"):
        check_fields({"epoch": True}, fields, "c.pth")


def test_load_model_state_explains_a_mismatch():
    model = nn.Sequential(nn.Linear(2, 3))
    state = {"module.0.weight": torch.zeros(3, 2), "module.0.bias": torch.zeros(3)}
    load_model_state(model, state, "c.pth")
    assert torch.equal(model[0].weight, torch.zeros(3, 2))
    assert list(strip_module_prefix(state)) == ["0.weight", "0.bias"]
    with pytest.raises(UserError, match=r"does not fit this model \(check --arch\): missing keys: 0.bias"):
        load_model_state(model, {"0.weight": torch.zeros(3, 2)}, "c.pth", hint="check --arch")
    with pytest.raises(UserError, match=r"shape mismatches \(checkpoint vs model\): 0.weight \[4, 2\] vs \[3, 2\]"):
        load_model_state(model, {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(3)}, "c.pth")


def test_rank_buffers_round_trip():
    source, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    source(torch.randn(4, 3))
    load_rank_buffers(target, rank_buffers(source))
    assert torch.equal(target.running_mean, source.running_mean)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    device = torch.device("cpu")
    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # leaves a cached Gaussian in the legacy state
    torch.manual_seed(3)
    path = tmp_path / "rng.pth"
    torch.save(capture_rng_state(device), path)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(1))
    restore_rng_state(torch.load(path, weights_only=True), device)
    assert (random.random(), np.random.normal(), np.random.rand()) == expected[:3]
    assert torch.equal(torch.rand(1), expected[3])


def test_seed_all_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from mabn.utils.checkpoint import seed_all

    with torch.random.fork_rng():
        state = random.getstate(), np.random.get_state()
        try:
            seed_all(3)
            first = (random.random(), float(np.random.rand()), float(torch.rand(())))
            seed_all(3)
            assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
