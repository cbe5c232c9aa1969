"""Ctrl-C that stops a run, even when a library swallows it.

Python turns SIGINT into a `KeyboardInterrupt` raised wherever the main
thread happens to be. Some places drop it: an object's `__del__` (TensorFlow
frees resources there; Python prints "Exception ignored" and goes on), or an
`asyncio.run` that swaps in its own SIGINT handler, which only cancels its
task (a coroutine may catch that and return normally). The run then trains
on to the end as if no key had been pressed.

`handled()` (the command line, around a flow) replaces the handler with
one that says at once that the run is stopping, remembers the interrupt and
raises; `check()`, called where a run can stop cleanly (a stage's start,
each epoch's start, the evaluate, health, export and report tasks),
raises it again if it was dropped.
A SIGINT that the process ignores (a shell's background job) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["check", "handled", "requested"]

_requested = threading.Event()


def _on_sigint(signum, frame) -> None:
    if not _requested.is_set():
        _requested.set()
        # os.write: a signal handler must not re-enter a buffered stream.
        with contextlib.suppress(OSError):  # stderr closed: stop all the same
            os.write(2, b"\nthumbnet: Ctrl-C: stopping the run...\n")
    raise KeyboardInterrupt


@contextlib.contextmanager
def handled():
    """Handles SIGINT as described above meanwhile (from the main thread;
    not where SIGINT is ignored or has a handler of its own), then puts the
    previous handler back."""
    previous = signal.getsignal(signal.SIGINT)
    if (
        threading.current_thread() is not threading.main_thread()
        or previous is not signal.default_int_handler
    ):
        yield
        return
    _requested.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()


def requested() -> bool:
    """Whether a Ctrl-C arrived inside `handled()`."""
    return _requested.is_set()


def check() -> None:
    """Raises `KeyboardInterrupt` if a Ctrl-C arrived: a point where the run
    can stop (the interrupt it raised first may have been dropped)."""
    if _requested.is_set():
        raise KeyboardInterrupt
