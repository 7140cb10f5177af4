"""In-process meshes for tests and benches: several Routers in one trio run, each on its own
loopback address (127.x.y.11, .12, ...) sharing one port, talking real TCP with fast timings.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trio

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.router import MeshTimings, Router
from weavenet.store import Store

FAST = MeshTimings.fast()


TestBody = Callable[..., Coroutine[Any, Any, None]]


def harness_scenario(
    make: Callable[[trio.Nursery, Path, pytest.LogCaptureFixture], Any], *, default_timeout: float, with_caplog: bool
) -> Callable[..., Callable[[TestBody], Callable[..., None]]]:
    """A decorator factory: run an async test body under trio with a deadline, handing it a fresh
    harness from `make` (and pytest's caplog if `with_caplog`); the harness's stores are closed after."""

    def scenario(
        timeout: float = default_timeout,
    ) -> Callable[[Callable[..., Coroutine[Any, Any, None]]], Callable[..., None]]:
        def wrap(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
            def run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
                caplog.set_level(logging.INFO, logger="weavenet")

                async def main() -> None:
                    harness = None
                    try:
                        with trio.fail_after(timeout):
                            async with trio.open_nursery() as nursery:
                                harness = make(nursery, tmp_path, caplog)
                                await (fn(harness, caplog) if with_caplog else fn(harness))
                                nursery.cancel_scope.cancel()
                    finally:  # a failed test's stores are closed too (its routers have stopped by now)
                        for store in harness.stores.values() if harness is not None else ():
                            store.close()

                trio.run(main)

            run.__name__, run.__doc__ = fn.__name__, fn.__doc__
            return run

        return wrap

    return scenario


def free_port(host: str) -> int:
    """A TCP port free on `host` now, outside the kernel's ephemeral range: between this probe and
    the routers' bind, no connect() anywhere on the machine can be given it as its local port."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    outside = [port for port in range(1024, 65536) if not low <= port <= high]
    for port in random.sample(outside, min(100, len(outside))):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue  # someone (maybe on 0.0.0.0) has it
            return port
    raise RuntimeError(f"no free port on {host} outside the ephemeral range {low}-{high} (ip_local_port_range)")


class Mesh:
    """Routers on 127.<random>.<random>.{11,12,...} sharing one port, each stoppable on its own."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture | None = None) -> None:
        self.nursery = nursery
        self.caplog = caplog
        self.tmp_path = tmp_path
        self.prefix = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
        self.port = free_port(self.ip(0))
        self.routers: dict[int, Router] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.stores: dict[int, Store] = {}

    def ip(self, i: int) -> str:
        return f"{self.prefix}.{11 + i}"

    def addr(self, i: int) -> str:
        return f"{self.ip(i)}:{self.port}"

    @staticmethod
    def name(i: int) -> PeerName:
        return PeerName(0x0E0000000000 + i + 1)

    async def start(self, i: int, **options: Any) -> Router:
        store = self.stores.get(i) or Store(self.tmp_path / f"router{i}")
        self.stores[i] = store
        settings: dict[str, Any] = {"mesh_key": None, "timings": FAST}
        settings.update(options)
        router = Router(
            name=self.name(i), nickname=f"host{i}", listen_host=self.ip(i), port=self.port, store=store, **settings
        )
        self.routers[i] = router

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes[i] = scope
                await router.serve(task_status=task_status)

        await self.nursery.start(run)
        return router

    def stop(self, i: int) -> None:
        self.scopes.pop(i).cancel()

    def __getitem__(self, i: int) -> Router:
        return self.routers[i]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Wait until `check()` holds; returns how long it took. Fails with `what` on timeout."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.01)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


scenario = harness_scenario(Mesh, default_timeout=20.0, with_caplog=False)
"""`@scenario(timeout)`: the test body gets a fresh `Mesh`."""
