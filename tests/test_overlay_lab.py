"""Containers on different hosts talk through real routers and their Rust datapaths.

Three lab hosts each run `weavenet launch`; a "container" namespace on each is attached with
`weavenet attach` (addresses from IPAM); pings, ARP broadcast, multicast and relaying are checked
end to end, plain and encrypted.
"""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from tests.lab import Container, Lab, wait_until
from tests.routers import LabRouter, full_mesh

PASSWORD = "overlay test password"


def start_mesh(lab: Lab, *, password: str | None = None, extra: tuple[str, ...] = ()) -> list[LabRouter]:
    first = lab.hosts[0]
    quorum = ("--ipalloc-init", f"consensus={len(lab.hosts)}")
    routers = [LabRouter(first, [], password=password, extra=(*quorum, *extra))]
    routers += [LabRouter(host, [first.address], password=password, extra=(*quorum, *extra)) for host in lab.hosts[1:]]
    for router in routers:
        router.wait_ready()
    # Established means the datapaths' UDP heartbeats got through, both ways, on every link.
    wait_until(lambda: full_mesh(routers), timeout=60, message="every datapath link to come up")
    return routers


def attach(router: LabRouter, name: str = "c") -> tuple[Container, str]:
    container = router.host.add_container(name)
    output = router.cli("attach", container.path).strip()
    address = ipaddress.ip_interface(output.split()[-1])
    return container, str(address.ip)


def pings(container: Container, address: str) -> bool:
    return container.run(["ping", "-c1", "-W2", address], check=False).returncode == 0


@pytest.mark.lab(hosts=3)
@pytest.mark.parametrize("password", [None, PASSWORD], ids=["plain", "encrypted"])
def test_containers_on_three_hosts_reach_each_other(lab: Lab, password: str | None):
    routers = start_mesh(lab, password=password)
    attached = [attach(router) for router in routers]
    addresses = [address for _, address in attached]
    assert len(set(addresses)) == 3, f"IPAM handed out duplicates: {addresses}"
    for (src, _), (_, dst) in itertools.permutations(attached, 2):
        wait_until(lambda src=src, dst=dst: pings(src, dst), timeout=20, message=f"{src} to reach {dst}")
    ps = routers[0].cli("ps")
    assert addresses[0] in ps, ps
    status = routers[0].cli("status", "connections")
    assert "fastdp" in status, status
    if password:
        assert "encrypted" in status and "Encryption: enabled" in routers[0].cli("status")


@pytest.mark.lab(hosts=3)
def test_relay_through_the_middle_when_a_direct_link_is_cut(lab: Lab):
    routers = start_mesh(lab)
    (c1, ip1), _, (c3, ip3) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip3), timeout=20, message="h1's container to reach h3's")
    a, _, c = routers
    lab.cut(lab.hosts[0], lab.hosts[2])
    # The datapath notices the silent link, the mesh routes h1 <-> h3 via h2, and frames are relayed.
    wait_until(lambda: c.name not in a.established(), timeout=60, message="h1 to see its link to h3 down")
    wait_until(lambda: pings(c1, ip3) and pings(c3, ip1), timeout=60, message="pings to be relayed via h2")
    lab.heal(lab.hosts[0], lab.hosts[2])
    wait_until(lambda: full_mesh(routers), timeout=90, message="the direct link to return")
    assert pings(c1, ip3)
