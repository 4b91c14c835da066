"""mabn.utils.errors: one-line messages and exit statuses."""
from __future__ import annotations

import pytest

from mabn.utils.errors import (CorruptImageError, NonFiniteLossError, NonFiniteStateError, UserError, exit_status,
                               one_line, run_cli)


def test_one_line_unwraps_a_worker_traceback():
    wrapped = RuntimeError("Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File x\nmabn.utils.errors.CorruptImageError: cannot decode image file 'a.png'")
    assert one_line(wrapped) == "cannot decode image file 'a.png'"
    assert one_line(UserError("two\nlines")) == "two lines"
    assert one_line(UserError()) == "UserError"


def test_exit_statuses():
    assert exit_status(NonFiniteLossError("x")) == exit_status(NonFiniteStateError("x")) == 3
    assert exit_status(UserError("x")) == exit_status(CorruptImageError("x")) == 2
    assert exit_status(RuntimeError("... CorruptImageError: bad")) == 2
    assert exit_status(RuntimeError("a bug")) is None


def test_run_cli_reports_one_line_and_lets_bugs_raise(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def bad_input():
        raise UserError("--x 1: wrong")

    def nan():
        raise NonFiniteStateError("non-finite value in model/w")

    assert run_cli(bad_input) == 2 and capsys.readouterr().err == "error: --x 1: wrong\n"
    monkeypatch.setenv("RANK", "3")
    assert run_cli(nan) == 3 and capsys.readouterr().err == "error (rank 3): non-finite value in model/w\n"
    assert run_cli(lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 // 0)
