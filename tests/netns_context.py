"""Run test code inside a lab namespace: `with inside(host): ...` switches this thread's netns.

pyroute2 and the iptables subprocesses weavenet's host plumbing starts then act on that namespace,
exactly as they would in a router running there. Always switched back, even when the body fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import netns

from tests.lab import Namespace


@contextmanager
def inside(namespace: Namespace) -> Iterator[None]:
    netns.pushns(namespace.path)
    try:
        yield
    finally:
        netns.popns()
