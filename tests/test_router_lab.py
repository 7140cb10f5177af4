"""The mesh with real router processes in lab hosts: convergence, routes, partitions, restarts, passwords.

Every router is `weavenet launch --foreground` in its own network namespace, talking over the lab's
underlay; the tests read each router's HTTP API as a script would and cut links as a network would.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.lab import Lab, wait_until
from tests.routers import LabRouter, full_mesh

pytestmark = pytest.mark.lab


def start_routers(lab: Lab, seeds: dict[str, list[str]], **kwargs: object) -> dict[str, LabRouter]:
    routers = {}
    for host in lab.hosts:
        peers = [lab.host(seed).address for seed in seeds.get(host.label, [])]
        routers[host.label] = LabRouter(host, peers, **kwargs)  # type: ignore[arg-type]
    for router in routers.values():
        router.wait_ready()
    return routers


def unicast_via(router: LabRouter, dest: LabRouter) -> str | None:
    for route in router.router()["UnicastRoutes"]:
        if route["Dest"] == dest.name:
            return route["Via"]
    return None


def duplicate_connections(router: LabRouter) -> list[str]:
    me = next(p for p in router.router()["Peers"] if p["Name"] == router.name)
    names = [c["Name"] for c in me["Connections"]]
    return sorted({n for n in names if names.count(n) > 1})


@pytest.mark.lab(hosts=5)
def test_five_routers_with_one_seed_each_converge_to_a_full_mesh(lab: Lab):
    # h1 knows nobody; every other host knows only its predecessor: discovery must do the rest.
    seeds = {f"h{n}": [f"h{n - 1}"] for n in range(2, 6)}
    routers = list(start_routers(lab, seeds).values())
    started = time.monotonic()
    wait_until(lambda: full_mesh(routers), timeout=60, message="5 routers to form a full mesh")
    elapsed = time.monotonic() - started
    peer_sets = {frozenset(r.peer_names()) for r in routers}
    assert len(peer_sets) == 1, f"routers disagree on the peer set: {peer_sets}"
    status = routers[0].cli("status")
    assert "Peers: 5" in status and "Encryption: disabled" in status, status
    assert "4 established" in status, status
    print(f"5-router full mesh in {elapsed:.1f}s after all APIs answered")


@pytest.mark.lab(hosts=3)
def test_line_topology_routes_via_the_middle_until_the_direct_link_heals(lab: Lab):
    h1, _, h3 = lab.hosts
    lab.cut(h1, h3)
    routers = start_routers(lab, {"h1": ["h2", "h3"], "h3": ["h2"]})
    a, b, c = routers["h1"], routers["h2"], routers["h3"]
    wait_until(
        lambda: a.established() == {b.name} and c.established() == {b.name},
        timeout=60,
        message="h1 and h3 to be connected to h2 only",
    )
    wait_until(lambda: unicast_via(a, c) == b.name, timeout=30, message="h1's route to h3 to go via h2")
    wait_until(lambda: unicast_via(c, a) == b.name, timeout=30, message="h3's route to h1 to go via h2")
    # h1 keeps h3 as a target and retries it with backoff; healing the link brings the direct route back.
    assert any(t.startswith(h3.address) for t in a.router()["Targets"])
    lab.heal(h1, h3)
    wait_until(lambda: full_mesh([a, b, c]), timeout=90, message="the direct h1-h3 link to come back")
    wait_until(lambda: unicast_via(a, c) == c.name, timeout=30, message="h1's route to h3 to be direct")


@pytest.mark.lab(hosts=5)
def test_a_partition_heals_by_itself_without_duplicate_connections(lab: Lab):
    routers = list(start_routers(lab, {f"h{n}": ["h1"] for n in range(2, 6)}).values())
    wait_until(lambda: full_mesh(routers), timeout=60, message="the initial full mesh")
    left, right = lab.hosts[:2], lab.hosts[2:]
    for x in left:
        for y in right:
            lab.cut(x, y)
    a, c = routers[0], routers[2]
    # While cut, the two sides lose each other (heartbeats stop) but each side stays connected.
    wait_until(lambda: c.name not in a.established(), timeout=90, message="h1 to notice the partition")
    assert routers[1].name in a.established()
    lab.heal_all()
    wait_until(lambda: full_mesh(routers), timeout=120, message="the mesh to heal after the partition")
    # Both sides redial when the cut heals; the tie-break closes the loser of each race asynchronously.
    wait_until(
        lambda: all(duplicate_connections(r) == [] for r in routers),
        timeout=30,
        message=lambda: (
            "no duplicate connections, still: "
            + "; ".join(f"{r}: {d}" for r in routers if (d := duplicate_connections(r)))
        ),
    )
    assert full_mesh(routers), "the mesh must stay full once the duplicates are gone"
    for router in routers:
        assert duplicate_connections(router) == [], f"{router} has duplicate connections"


@pytest.mark.lab(hosts=3)
def test_a_killed_router_restarts_and_rejoins_from_its_persisted_targets(lab: Lab):
    routers = start_routers(lab, {"h2": ["h1"], "h3": ["h1"]})
    a, c = routers["h1"], routers["h3"]
    everyone = list(routers.values())
    wait_until(lambda: full_mesh(everyone), timeout=60, message="the initial full mesh of 3")
    name_before = c.name
    c.process.kill(signal.SIGKILL)
    assert c.process.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: name_before not in a.established(), timeout=60, message="h1 to see h3 gone")
    # Restart with no peers on the command line: the persisted targets must bring it back.
    restarted = LabRouter(lab.host("h3"), [], name="weavenet-restarted")
    restarted.wait_ready()
    assert restarted.name == name_before, "the peer name must survive a restart"
    wait_until(lambda: full_mesh([a, routers["h2"], restarted]), timeout=60, message="the restarted h3 to rejoin")


@pytest.mark.lab(hosts=3)
def test_a_wrong_password_is_refused_and_logged_on_both_sides(lab: Lab):
    h1, h2, h3 = lab.hosts
    a = LabRouter(h1, [], password="correct horse battery staple")
    a.wait_ready()
    wrong = LabRouter(h2, [h1.address], password="not the password")
    right = LabRouter(h3, [h1.address], password="correct horse battery staple")
    wrong.wait_ready()
    right.wait_ready()
    wait_until(lambda: a.established() == {right.name}, timeout=60, message="the right password to connect")
    assert "Encryption: enabled" in a.cli("status")
    wait_until(lambda: "password mismatch" in wrong.log(), timeout=60, message="h2 to log the mismatch")
    wait_until(lambda: "password mismatch" in a.log(), timeout=60, message="h1 to log the mismatch")
    assert "password mismatch" in wrong.cli("status", "connections")
    assert wrong.established() == set()
    assert wrong.name not in a.peer_names()
    # Nobody crashed: both still serve their API.
    assert a.process.returncode is None and wrong.process.returncode is None
