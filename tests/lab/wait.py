"""Waiting with a deadline: poll a condition until it holds or time runs out.

This is how lab code and lab tests synchronise with the world (a router listening, a route
converging, a cut taking effect). It must never be replaced by a bare `time.sleep(n)` used as
synchronisation: sleeps are only the polling interval here, and every wait ends in a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LabTimeout(AssertionError):
    """A lab condition did not hold before its deadline.

    An AssertionError so pytest reports it as a failed expectation, not as an error in the harness.
    """


class Deadline:
    """A point in (monotonic) time, for loops that wait on several things under one budget."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.expires = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.expires - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy; return that.

    Raises LabTimeout after `timeout` seconds, saying what was awaited (`message`, or the
    predicate's name), how long, how many checks, and the last ignored exception if any.
    `message` may be a callable, evaluated only on failure, to describe the state at the deadline.
    Exceptions of the types in `ignore` count as "not yet"; any other exception propagates at once.
    The predicate is always checked at least once, and once more at the deadline.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError(f"wait_until: timeout must be >= 0 and interval > 0 (got {timeout}, {interval})")
    deadline = Deadline(timeout)
    checks = 0
    last_error: BaseException | None = None
    while True:
        final = deadline.expired()
        checks += 1
        try:
            result = predicate()
        except ignore as error:
            last_error = error
        else:
            if result:
                return result
        if final:
            break
        time.sleep(min(interval, max(deadline.remaining(), 0.001)))

    if message is None:
        what = getattr(predicate, "__qualname__", repr(predicate))
    elif callable(message):
        what = message()
    else:
        what = message
    detail = f" (last error: {type(last_error).__name__}: {last_error})" if last_error is not None else ""
    raise LabTimeout(f"timed out after {timeout:g}s waiting for: {what} [{checks} checks]{detail}")
