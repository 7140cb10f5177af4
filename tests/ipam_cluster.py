"""In-process IPAM clusters for tests: routers on 127.x.y.{11,12,...} (real TCP, fast timings),
each with an Allocator, stoppable and restartable with the same store.

Used by tests/test_ipam_*.py. Everything runs in one trio run under the test's deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Network
from pathlib import Path

import trio

from tests.mesh_harness import Mesh, harness_scenario
from weavenet.config import IpallocInit
from weavenet.ipam.allocator import Allocator, IpamTimings
from weavenet.mesh.router import MeshTimings, Router
from weavenet.store import Store

FAST_MESH = MeshTimings.fast()
FAST_IPAM = IpamTimings.fast()
RANGE = IPv4Network("10.32.0.0/12")


class Cluster(Mesh):
    """Peers i = 0, 1, ... named 0e:00:00:00:00:0{i+1}, nicknamed host{i}, each with an Allocator."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        super().__init__(nursery, tmp_path)
        self.allocators: dict[int, Allocator] = {}

    async def start(
        self,
        i: int,
        *,
        init: str = "consensus",
        ipalloc_range: IPv4Network = RANGE,
        default_subnet: IPv4Network | None = None,
        connect: Sequence[int] = (),
        nickname: str | None = None,
        targets: int | None = None,
    ) -> Allocator:
        """Start peer i (again, with its old store if it ran before) and connect it to `connect`."""
        store = self.stores.get(i) or Store(self.tmp_path / f"peer{i}")
        self.stores[i] = store
        router = Router(
            name=self.name(i),
            nickname=nickname or f"host{i}",
            listen_host=self.ip(i),
            port=self.port,
            mesh_key=None,
            store=store,
            timings=FAST_MESH,
        )
        allocator = Allocator(
            router,
            store,
            ipalloc_range=ipalloc_range,
            default_subnet=default_subnet,
            init=IpallocInit.parse(init),
            targets=len(connect) if targets is None else targets,
            timings=FAST_IPAM,
        )
        self.routers[i], self.allocators[i] = router, allocator

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes[i] = scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(router.serve)
                    await nursery.start(allocator.run)
                    task_status.started()

        await self.nursery.start(run)
        if connect:
            await router.connect([self.addr(j) for j in connect])
        return allocator

    def __getitem__(self, i: int) -> Allocator:  # type: ignore[override]
        return self.allocators[i]

    def connected(self, i: int, j: int) -> bool:
        return self.name(j) in self.routers[i].connected_peers()


scenario = harness_scenario(
    lambda nursery, tmp_path, caplog: Cluster(nursery, tmp_path), default_timeout=30.0, with_caplog=True
)
"""`@scenario(timeout)`: the test body gets a fresh `Cluster` and pytest's caplog."""


def ring_view(allocator: Allocator) -> list[tuple[int, int, int]]:
    """(token, owner, version) of every entry: equal on every peer once gossip has converged."""
    return [(e.token, e.peer, e.version) for e in allocator.ring.entries()]


def all_addresses(allocators: Sequence[Allocator]) -> list[str]:
    return [str(a.ip) for alloc in allocators for addrs in alloc.owned().values() for a in addrs]
