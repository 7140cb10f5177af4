"""IPAM with real router processes in lab hosts: consensus, a partition, a restart, rmpeer, seeds.

Each router is `weavenet launch --foreground` in its own network namespace; the test allocates
through each router's HTTP API (POST /ip/<id>) as a script or the Docker plugin would, cuts the
underlay between hosts as a network would, and checks what users care about: no address is ever
handed out twice, each side keeps allocating while cut off, and nothing is lost on restart.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_address
from typing import Any

import pytest

from tests.lab import Lab, wait_until
from tests.routers import LabRouter, full_mesh
from weavenet.api.client import ApiClient
from weavenet.config import HttpAddress

pytestmark = pytest.mark.lab

CONSENSUS = ["--ipalloc-init", "consensus=3"]


def api(router: LabRouter, timeout: float = 40.0) -> ApiClient:
    return ApiClient(HttpAddress(unix_path=str(router.api_socket)), timeout=timeout)


def allocate(router: LabRouter, ident: str, timeout: float = 20.0) -> str:
    reply = api(router, timeout + 10).request("POST", f"/ip/{ident}?timeout={timeout:g}")
    assert reply.status == 200, f"{router}: allocate {ident}: HTTP {reply.status}: {reply.text}"
    return reply.text.strip()


def allocate_many(router: LabRouter, prefix: str, n: int) -> list[str]:
    return [allocate(router, f"{prefix}-{i}") for i in range(n)]


def owned(router: LabRouter) -> dict[str, list[str]]:
    reply = api(router).request("GET", "/ip")
    assert reply.status == 200, reply.text
    return {row["containerid"]: row["addrs"] for row in reply.json()["owned"]}


def ipam(router: LabRouter) -> dict[str, Any]:
    report = router.report()
    assert report is not None, f"{router} does not answer"
    return report["IPAM"]


def ring(router: LabRouter) -> list[tuple[str, str, int]]:
    return [(e["Token"], e["Peer"], e["Version"]) for e in ipam(router)["Entries"]]


def rings_agree(routers: Sequence[LabRouter]) -> bool:
    views = [ring(r) for r in routers]
    return bool(views[0]) and all(v == views[0] for v in views)


def addresses(routers: Sequence[LabRouter]) -> list[str]:
    return [a.split("/")[0] for r in routers for addrs in owned(r).values() for a in addrs]


def in_parallel(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def start(lab: Lab, extra: Sequence[str], seeds: dict[str, list[str]]) -> list[LabRouter]:
    routers = [
        LabRouter(host, [lab.host(s).address for s in seeds.get(host.label, [])], extra=extra) for host in lab.hosts
    ]
    for router in routers:
        router.wait_ready()
    wait_until(lambda: full_mesh(routers), timeout=60, message="a full mesh")
    return routers


@pytest.mark.lab(hosts=3)
def test_consensus_partition_heal_and_restart_never_duplicate(lab: Lab):
    routers = start(lab, CONSENSUS, {"h2": ["h1"], "h3": ["h1", "h2"]})
    a, b, c = routers
    # Consensus among three, then each host allocates from its own share: disjoint.
    first = in_parallel({r.host.label: (lambda r=r: allocate_many(r, f"pre-{r.host.label}", 10)) for r in routers})
    assert len({x for got in first.values() for x in got}) == 30, f"duplicates before the partition: {first}"
    wait_until(lambda: rings_agree(routers), timeout=60, message="one ring on all three")
    assert all(ipam(r)["Status"] == "ready" for r in routers)
    status = a.cli("status")
    assert "Service: ipam" in status and "Status: ready" in status and "Range: 10.32.0.0/12" in status, status
    metrics = a.metrics()
    assert 'weave_ips{state="local-used"} 10' in metrics and "weave_max_ips 1048576" in metrics, metrics
    assert "weave_ipam_unreachable_count 0" in metrics and "weave_ipam_pending_allocates 0" in metrics

    # Partition {h1} | {h2, h3}: each side keeps allocating, with no help from the other.
    lab.cut("h1", "h2")
    lab.cut("h1", "h3")
    cut_at = time.monotonic()
    during = in_parallel(
        {
            "h1": lambda: allocate_many(a, "cut-h1", 100),
            "h2": lambda: allocate_many(b, "cut-h2", 50),
            "h3": lambda: allocate_many(c, "cut-h3", 50),
        }
    )
    cut_for = time.monotonic() - cut_at
    assert sum(len(v) for v in during.values()) == 200
    # A ring change on the {h2, h3} side while h1 cannot hear it: h3 claims a free address of
    # h2's, which h2 hands over (a single-address donation). h1 learns of it only after the heal.
    token = next(int(ip_address(e["Token"])) for e in ipam(b)["Entries"] if e["Peer"] == b.name)
    static = ip_address(token + 1000)
    reply = api(c).request("PUT", f"/ip/static/{static}/12?timeout=20")
    assert reply.status == 204, reply.text
    wait_until(lambda: rings_agree([b, c]), timeout=30, message="h2 and h3 to agree during the cut")
    assert ring(a) != ring(c), "h1 must not see the donation while cut off"
    lab.heal_all()
    wait_until(lambda: rings_agree(routers), timeout=90, message="rings to agree after the heal")
    everything = addresses(routers)
    duplicates = [addr for addr, n in Counter(everything).items() if n > 1]
    assert duplicates == [], f"duplicate addresses after the heal: {duplicates}"
    assert len(everything) == 231
    assert f"{static}/12" in owned(c)["static"]
    print(f"200 allocations on both sides of a partition in {cut_for:.1f}s; 231 addresses, no duplicates")

    # Restart h2: what it held is unchanged, and none of it is handed out again.
    before = owned(b)
    b.process.kill(signal.SIGTERM)
    assert b.process.wait(timeout=20) is not None
    b = LabRouter(lab.host("h2"), [lab.host("h1").address], extra=CONSENSUS, name="weavenet-restarted")
    b.wait_ready()
    assert owned(b) == before, "a restarted router must keep its allocations"
    assert allocate(b, "pre-h2-0") == before["pre-h2-0"][0], "allocate is idempotent across the restart"
    fresh = allocate_many(b, "after-restart", 20)
    held = set(everything)
    assert not {f.split("/")[0] for f in fresh} & held, "a restarted router re-issued a held address"


@pytest.mark.lab(hosts=3)
def test_rmpeer_of_a_killed_router_on_two_hosts_takes_its_space_over_once(lab: Lab):
    routers = start(lab, CONSENSUS, {"h2": ["h1"], "h3": ["h1", "h2"]})
    a, b, c = routers
    in_parallel({r.host.label: (lambda r=r: allocate_many(r, r.host.label, 5)) for r in routers})
    wait_until(lambda: rings_agree(routers), timeout=60, message="one ring on all three")
    dead = c.name
    dead_size = sum(e["Size"] for e in ipam(a)["Entries"] if e["Peer"] == dead)
    assert dead_size > 0
    refused = a.cli("rmpeer", "h3", check=False)
    assert "is reachable, so it is not dead" in refused, refused

    c.process.kill(signal.SIGKILL)
    c.process.wait(timeout=10)
    unreachable = lambda r: dead not in r.peer_names()  # noqa: E731
    wait_until(lambda: unreachable(a) and unreachable(b), timeout=60, message="h1 and h2 to lose h3")
    # Two operators run rmpeer at once, one by name and one by nickname.
    replies: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def rmpeer(router: LabRouter, who: str) -> None:
        barrier.wait()
        replies[router.host.label] = router.cli("rmpeer", who).strip()

    in_parallel({"h1": lambda: rmpeer(a, dead), "h2": lambda: rmpeer(b, "h3")})
    taken = sorted(int(reply.split()[0]) for reply in replies.values())
    assert taken == [0, dead_size], f"the dead peer's space must be taken over exactly once: {replies}"
    wait_until(lambda: rings_agree([a, b]), timeout=60, message="h1 and h2 to agree")
    assert dead not in {e["Peer"] for e in ipam(a)["Entries"]}
    assert ipam(a)["Disputed"] == [] and ipam(b)["Disputed"] == []
    more = in_parallel({"h1": lambda: allocate_many(a, "after-h1", 40), "h2": lambda: allocate_many(b, "after-h2", 40)})
    survivors = addresses([a, b])
    assert len(survivors) == len(set(survivors)) == 90, "no duplicates after the takeover"
    assert all(len(v) == 40 for v in more.values())
    assert "unreachable" not in a.cli("status", "ipam")

    # `weavenet reset` on h2 hands its space to h1 (confirmed) before the router stops.
    reset = b.cli("reset", "--state-dir", str(b.state_dir))
    assert "warning" not in reset and "removed" in reset, reset
    assert b.process.wait(timeout=30) is not None
    assert {e["Peer"] for e in ipam(a)["Entries"]} == {a.name}, "h1 holds everything after h2's reset"
    assert len(set(allocate_many(a, "after-reset", 5))) == 5


@pytest.mark.lab(hosts=1)
def test_a_range_overlapping_a_host_route_is_refused_at_launch(lab: Lab):
    (h1,) = lab.hosts
    h1.run(["ip", "route", "add", "10.32.128.0/20", "dev", h1.interface])
    router = LabRouter(h1, [])
    assert router.process.wait(timeout=30) != 0
    wait_until(lambda: "--ipalloc-range" in router.log(), timeout=10, message="the launch error")
    last = router.log().strip().splitlines()[-1]
    assert last == (
        "weavenet: launch: --ipalloc-range: 10.32.0.0/12 overlaps the host route 10.32.128.0/20 dev eth0; "
        "choose a range no host route uses (or remove that route)"
    ), last


@pytest.mark.lab(hosts=2)
def test_rings_seeded_differently_are_refused_clearly_and_both_keep_running(lab: Lab):
    h1, h2 = lab.hosts
    a = LabRouter(h1, [], extra=["--name", "::1", "--ipalloc-init", "seed=::1"])
    b = LabRouter(h2, [h1.address], extra=["--name", "::2", "--ipalloc-init", "seed=::2"])
    for router in (a, b):
        router.wait_ready()
    assert allocate(a, "c1", timeout=5) == allocate(b, "c1", timeout=5) == "10.32.0.1/12"  # no network needed
    expected = "IP allocation was seeded by different peers (received: [00:00:00:00:00:02], ours: [00:00:00:00:00:01])"
    wait_until(lambda: expected in a.cli("status", "ipam"), timeout=60, message="h1 to refuse h2's ring")
    wait_until(
        lambda: "seeded by different peers" in b.cli("status", "ipam"), timeout=60, message="h2 to refuse h1's ring"
    )
    assert "Refused: rings from 1 peer(s)" in a.cli("status")
    # "Established" follows the datapath's heartbeats, which may still be on their way: poll for it.
    wait_until(
        lambda: full_mesh([a, b]), timeout=60, message="the mesh connection to stay up despite the IPAM disagreement"
    )
    assert a.process.returncode is None and b.process.returncode is None
    assert [e["Peer"] for e in ipam(a)["Entries"]] == ["00:00:00:00:00:01"]
