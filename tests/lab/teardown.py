"""Making sure open labs are closed when the test process ends, however it ends (short of SIGKILL).

- Every started lab is registered here until it closes; an atexit hook closes what is left.
- SIGTERM and SIGHUP, when nobody else handles them, become KeyboardInterrupt in the main thread,
  so pytest (or a `with Lab()` block) unwinds and runs its teardown exactly as for Ctrl-C. The
  first such signal restores the previous disposition, so a second one kills as before.
- While a lab closes, Ctrl-C and SIGTERM are held back and re-delivered once it is done, so an
  impatient interrupt does not leave half a lab behind. The same signal a second time gives up
  and interrupts at once (the sweeper, `python -m tests.lab --cleanup`, handles the rest).
- A process forked from the test process (pyroute2 forks helpers) inherits all this; there the
  hooks do nothing and signals do what they would have done without us.
SIGKILL cannot be caught: that case is the sweeper's. This module must never replace a signal
handler somebody else installed, never touch signals outside the main thread, and never close a
lab from any process but the one that opened it.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol


class Closable(Protocol):
    def close(self) -> None: ...


_open: list[Closable] = []
_guard = threading.Lock()
_installed = False
_owner_pid = -1  # the process that registered labs; forked children must leave them alone
_CONVERTED = (signal.SIGTERM, signal.SIGHUP)


def register(lab: Closable) -> None:
    """Remember an open lab (and, on first use, install the exit and signal hooks)."""
    global _installed, _owner_pid
    with _guard:
        _open.append(lab)
        if not _installed:
            _owner_pid = os.getpid()
            atexit.register(close_all)
            _convert_termination_signals()
            _installed = True


def unregister(lab: Closable) -> None:
    with _guard:
        if lab in _open:
            _open.remove(lab)


def close_all() -> None:
    """Close every lab still open (newest first). Runs at interpreter exit (of the owner only)."""
    if os.getpid() != _owner_pid:
        return
    while True:
        with _guard:
            if not _open:
                return
            lab = _open[-1]
        try:
            lab.close()
        finally:
            unregister(lab)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _convert_termination_signals() -> None:
    if not _in_main_thread():
        return
    for signum in _CONVERTED:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _owner_pid:
        _die_by_default(signum)
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: closing open labs")


def _die_by_default(signum: int) -> None:
    """What the signal would have done without us: used in forked children (pyroute2 forks
    helpers and ends them with SIGTERM), which must not unwind the parent's copied stack."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP for the duration (main thread only); re-deliver after."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    owner = os.getpid()

    def hold(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            _die_by_default(signum)
        if signum in received:  # asked twice: stop waiting for cleanup
            restore()
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} during lab cleanup")
        received.append(signum)

    watched = (signal.SIGINT, *_CONVERTED)
    previous = {signum: signal.getsignal(signum) for signum in watched}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN and handler is not None:
            signal.signal(signum, hold)
    try:
        yield
    finally:
        restore()
        if received:
            signal.raise_signal(received[0])
