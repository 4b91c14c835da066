"""mabn.utils.signals: SIGTERM and SIGINT set a flag inside the block, handlers restored after."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from mabn.utils.signals import StopFlag, stop_on_signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_flag_and_the_handlers_come_back(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    flag = StopFlag()
    with stop_on_signals(flag):
        os.kill(os.getpid(), signum)
        assert flag.requested and flag.signal_name == signal.Signals(signum).name
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_sigint_interrupts():
    flag = StopFlag()
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals(flag):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    assert flag.signal_name == "SIGINT"


def test_off_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with stop_on_signals(StopFlag()) as flag:
            seen.append(signal.getsignal(signal.SIGTERM) is before and not flag.requested)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [True]
