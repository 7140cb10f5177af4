"""How mesh convergence scales: 20 routers against 10, in one process, in the same run.

Routers run in-process on loopback (tests/mesh_harness.py) with production timings (batching and
backoff shortened), each given only the first router as its seed; convergence is every router
having established connections to all others. Each router hears O(n²) record updates (every
link change of every peer), each carrying that peer's O(n) connections: O(n³) per router, and one
process simulating n routers does O(n⁴): 16x for 20 routers against 10 (measured 13-16x). The gate
(at most 24x) catches anything worse than that.
Real routers run in parallel processes: tests/test_router_scale.py measures 30 of them.
Absolute times are printed, never asserted.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import trio

from benches.ratio import assert_speedup
from tests.mesh_harness import Mesh
from weavenet.mesh.router import MeshTimings

_runs = itertools.count()
# The test timings' 2 s read deadline is too tight for 870 connection ends sharing one trio loop:
# keep the production deadlines, and only the batching and backoff of the fast timings.
TIMINGS = replace(
    MeshTimings(), topology_batch=0.02, route_debounce=0.01, backoff_base=0.2, backoff_cap=2.0, accept_refill=0.001
)


TIMEOUT = 120.0


def converge(n: int, workdir: Path) -> None:
    state = workdir / f"run{next(_runs)}"
    meshes: list[Mesh] = []

    def complete(mesh: Mesh) -> int:
        """How many routers have an established connection to every other."""
        return sum(len(router.connected_peers()) == n - 1 for router in mesh.routers.values())

    async def main() -> None:
        try:
            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    mesh = Mesh(nursery, state)
                    meshes.append(mesh)
                    await mesh.start(0, timings=TIMINGS)
                    for i in range(1, n):
                        router = await mesh.start(i, timings=TIMINGS)
                        await router.connect([mesh.addr(0)])
                    while complete(mesh) < n:
                        await trio.sleep(0.005)
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            done = complete(meshes[0]) if meshes else 0
            raise AssertionError(
                f"timed out after {TIMEOUT:g}s waiting for {n} routers to form a full mesh "
                f"({done} of {n} connected to all others)"
            ) from None
        finally:  # the routers have stopped by now; their sqlite files are closed before the rmtree
            for mesh in meshes:
                for store in mesh.stores.values():
                    store.close()

    trio.run(main)
    shutil.rmtree(state, ignore_errors=True)


def test_convergence_cost_of_20_routers_against_10(benchmark):
    workdir = Path(tempfile.mkdtemp(prefix="weavenet-bench-"))
    try:
        result = assert_speedup(
            benchmark,
            lambda: converge(20, workdir),
            lambda: converge(10, workdir),
            at_least=1 / 24,
            label="convergence, 20 routers (ours) vs 10 routers (reference)",
        )
        print(f"10 routers converge in {result.reference_s * 1e3:.0f} ms, 20 in {result.ours_s * 1e3:.0f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
