"""Containers on different hosts talk through real routers and their Rust datapaths.

Three lab hosts each run `weavenet launch`; a "container" namespace on each is attached with
`weavenet attach` (addresses from IPAM); pings, ARP broadcast, multicast and relaying are checked
end to end, plain and encrypted.
"""

from __future__ import annotations

import ipaddress
import itertools
import signal
import sys

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
    # Plain peers go through the kernel fast path (once its heartbeats pass); encrypted ones stay
    # on the Rust datapath, which status calls sleeve and says why (test_kernel_path_lab.py has more).
    path = "sleeve" if password else "fastdp"
    wait_until(
        lambda: routers[0].cli("status", "connections").count(f" {path} ") == 2,
        timeout=15,
        message=f"both of h1's connections on {path}",
    )
    status = routers[0].cli("status", "connections")
    if password:
        assert "(encrypted)" in status and "Encryption: enabled" in routers[0].cli("status"), status


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
    # The datapath switches from the relay to the direct link as the new routes reach it: poll.
    c1.wait_reachable(ip3, timeout=30)
    c3.wait_reachable(ip1, timeout=30)


MULTICAST_RECEIVER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5555))
group = struct.pack("4s4s", socket.inet_aton("239.7.7.7"), socket.inet_aton(sys.argv[1]))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
print("listening", flush=True)
data, sender = s.recvfrom(1024)
print("got", data.decode(), "from", sender[0], flush=True)
"""

MULTICAST_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
for _ in range(20):
    s.sendto(b"hello-multicast", ("239.7.7.7", 5555))
"""


@pytest.mark.lab(hosts=3)
def test_multicast_reaches_receivers_on_every_other_host(lab: Lab):
    routers = start_mesh(lab)
    (c1, ip1), (c2, ip2), (c3, ip3) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2) and pings(c1, ip3), timeout=20, message="unicast to work first")
    receivers = [
        c.start([sys.executable, "-c", MULTICAST_RECEIVER, ip], name="mcast-rx") for c, ip in ((c2, ip2), (c3, ip3))
    ]
    for receiver in receivers:
        receiver.wait_for_output(r"listening", timeout=20)
    c1.run([sys.executable, "-c", MULTICAST_SENDER, ip1])
    for receiver in receivers:
        match = receiver.wait_for_output(r"got (\S+) from (\S+)", timeout=20)
        assert match.group(1) == "hello-multicast" and match.group(2) == ip1


@pytest.mark.lab(hosts=1)
def test_attach_detach_expose_and_hide_through_the_cli(lab: Lab):
    (router,) = start_mesh(lab)
    host = lab.hosts[0]
    c1, ip1 = attach(router, "c1")
    c2 = host.add_container("c2")
    subnet_address = router.cli("attach", "net:10.40.0.0/24", c2.path).strip()
    assert ipaddress.ip_interface(subnet_address).network == ipaddress.ip_network("10.40.0.0/24"), subnet_address
    ps = router.cli("ps")
    assert f"netns:{c1.name}" in ps and ip1 in ps and subnet_address in ps, ps
    # The host reaches containers once exposed; hide takes that away again.
    assert not host.ping(ip1)
    exposed = router.cli("expose").strip()
    assert ipaddress.ip_interface(exposed).network == ipaddress.ip_interface(f"{ip1}/12").network, exposed
    wait_until(lambda: host.ping(ip1), timeout=10, message="the host to reach the container after expose")
    router.cli("hide")
    wait_until(lambda: not host.ping(ip1), timeout=10, message="hide to take the host off the overlay")
    # Detach frees the address in IPAM: the next attach may get it again, and ps forgets c1.
    router.cli("detach", c1.path)
    assert f"netns:{c1.name}" not in router.cli("ps")
    assert router.client.request("GET", f"/ip/netns:{c1.name}").text.strip() == ""
    _, ip3 = attach(router, "c3")
    assert ip3 == ip1, "the freed address is the lowest free one again"


@pytest.mark.lab(hosts=2)
def test_a_restarted_router_keeps_attached_addresses_and_hands_out_new_ones(lab: Lab):
    routers = start_mesh(lab)
    c1, ip1 = attach(routers[0], "c1")
    _, ip_remote = attach(routers[1], "c1")
    wait_until(lambda: pings(c1, ip_remote), timeout=20, message="the containers to reach each other")
    routers[0].process.kill(signal.SIGKILL)
    routers[0].process.wait(timeout=10)
    restarted = LabRouter(lab.hosts[0], [], name="weavenet-restarted")
    restarted.wait_ready()
    wait_until(lambda: full_mesh([restarted, routers[1]]), timeout=60, message="the restarted router to rejoin")
    assert ip1 in restarted.cli("ps")
    wait_until(lambda: pings(c1, ip_remote), timeout=30, message="the old container to work again")
    _, ip_new = attach(restarted, "c2")
    assert ip_new not in (ip1, ip_remote)
