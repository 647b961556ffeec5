"""Pause a server's processes with SIGSTOP, as a GC pause or a VM hiccup would.

`kill(SIGSTOP)` returns before the process has stopped: the kernel wakes one thread, which
then stops the others, and on a loaded machine the rest can answer requests for milliseconds
more. A test that asserts "nothing answers" must wait until every thread is stopped.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_STOP_WAIT_SECONDS = 5.0


def _thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(FileNotFoundError):  # a thread that just exited
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
            states.append(text[text.rindex(")") + 2])  # the name may hold spaces and ')'
    return states


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + _STOP_WAIT_SECONDS
    # Z and X: it exited (a postgres backend whose client left, its parent already stopped and
    # so never reaping it): it runs no more either.
    while not all(state in "TtZX" for state in _thread_states(pid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {_STOP_WAIT_SECONDS} s")
        time.sleep(0.0005)


@contextmanager
def paused(*pids: int) -> Iterator[None]:
    """Every thread of every process in `pids` stopped for the block; continued after it."""
    stopped: list[int] = []
    try:
        for pid in pids:
            with suppress(ProcessLookupError):  # a postgres child that just exited
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        for pid in stopped:
            with suppress(FileNotFoundError):
                _wait_stopped(pid)
        yield
    finally:
        for pid in stopped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
