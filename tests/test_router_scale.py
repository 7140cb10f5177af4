"""Scale on this machine: 30 real routers in 30 lab hosts converge to one view of the mesh.

Reports the time from "every API answers" to "every router knows all 30 peers and has established
connections to all 29 others", and each router's resident memory (targets: < 10 s, < 60 MB).
"""

from __future__ import annotations

import time

import pytest

from tests.lab import Lab, wait_until
from tests.routers import LabRouter, full_mesh

ROUTERS = 30


@pytest.mark.slow
@pytest.mark.lab(hosts=ROUTERS)
def test_thirty_routers_converge_and_stay_small(lab: Lab):
    seed = lab.hosts[0]
    launched = time.monotonic()
    routers = [LabRouter(seed, [])]
    routers += [LabRouter(host, [seed.address]) for host in lab.hosts[1:]]
    for router in routers:
        router.wait_ready(timeout=120)
    started = time.monotonic()
    wait_until(lambda: full_mesh(routers), timeout=120, interval=0.25, message=f"{ROUTERS} routers to converge")
    converged_s = time.monotonic() - started
    since_launch_s = time.monotonic() - launched
    peer_sets = {frozenset(r.peer_names()) for r in routers}
    assert len(peer_sets) == 1 and len(next(iter(peer_sets))) == ROUTERS
    rss_mb = sorted(r.rss_bytes() / 2**20 for r in routers)
    print(
        f"\n{ROUTERS} routers: full agreement {converged_s:.1f}s after all APIs answered "
        f"({since_launch_s:.1f}s after the first launch); "
        f"RSS per router min {rss_mb[0]:.0f} MB, median {rss_mb[len(rss_mb) // 2]:.0f} MB, max {rss_mb[-1]:.0f} MB"
    )
    assert rss_mb[-1] < 60, f"a router uses {rss_mb[-1]:.0f} MB (target < 60 MB)"
    assert converged_s < 30, f"convergence took {converged_s:.1f}s (target < 10 s; failing above 30 s)"
