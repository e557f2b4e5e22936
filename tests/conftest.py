"""Suite-wide set-up."""

from __future__ import annotations

import signal

import pytest

# A shell starts background jobs with SIGINT ignored, and a Python child then
# inherits the ignore and never raises KeyboardInterrupt. The Ctrl-C tests
# deliver SIGINT to `loralab` subprocesses, so give them the terminal's
# behaviour: with a Python handler here, an exec'd child starts at SIG_DFL.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cli(*args) -> int:
    """Run ``loralab ARGS...`` in this process; return its exit code."""
    from loralab.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from a second thread; on a shared 2-core machine
    one thread avoids OpenMP spin contention. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition()`` until it is truthy (and return its value); fail after
    ``timeout`` seconds. A wait on what the test needs, never a fixed sleep."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)
    return value
