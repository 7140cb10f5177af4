"""The global `weave` driver end to end: two Docker 20.10 daemons sharing an etcd cluster store.

Each "host" is its own set of namespaces with its own dockerd and weavenet router (tests/
cluster_store.py); the machine's daemon is never touched. A network created on one host is seen on
the other (the store), addresses come from Docker's global IPAM, the host that did not create the
network gets CreateEndpoint with no CreateNetwork first, and Docker's node discovery introduces the
two routers to each other (no peers given at launch). Containers on the two hosts then ping each
other through the routers' Rust datapaths (TAP `weave-dp` on each weave bridge, UDP on the mesh
port), and only through them: cut the mesh port between the hosts and the ping fails; heal it and
the ping returns.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_store import ETCD, ClusterStoreLab, StoreHost
from tests.docker_hosts import dockerd_version
from tests.plugin_helpers import wait_for
from tests.prereq import missing

pytestmark = [pytest.mark.lab]

SUBNET = "10.231.0.0/24"


@pytest.fixture
def store_lab(tmp_path: Path) -> Iterator[ClusterStoreLab]:
    version = dockerd_version()
    if version is None:
        missing("dockerd (Debian package docker.io)")
    assert version is not None
    if version >= (23,):
        pytest.skip(f"dockerd {'.'.join(map(str, version))} has no --cluster-store (removed in 23.0)")
    if not Path(ETCD).exists():
        missing("etcd (Debian package etcd-server)")
    if not Path("/bin/busybox").exists():
        missing("/bin/busybox (Debian package busybox-static)")
    ClusterStoreLab.sweep()
    lab = ClusterStoreLab()
    try:
        with lab:
            print(f"cluster-store lab up in {lab.setup_seconds:.1f}s")
            try:
                yield lab
            finally:
                lab.keep_logs(tmp_path / "store-lab")  # the lab's own directory goes at close
    except BaseException:
        print(lab.logs())
        raise


def ethwe(host: StoreHost, container: str) -> str:
    out = host.docker("exec", container, "ip", "-o", "-4", "addr", "show").stdout
    found = re.search(r"\d+: ethwe\d+\s+inet (\S+)", out)
    assert found, out
    return found.group(1)


def pings(host: StoreHost, container: str, target: str) -> bool:
    return host.docker("exec", container, "ping", "-c", "1", "-W", "2", target, check=False).returncode == 0


def reaches(host: StoreHost, container: str, target: str, timeout: float = 30) -> None:
    """Wait until `container` on `host` pings `target`: a new container's path (ARP, the mesh's routes)
    settles after Docker has returned."""
    wait_for(
        lambda: pings(host, container, target),
        timeout=timeout,
        interval=0.5,
        what=f"{container} on host {host.name} to ping {target}",
    )


def calls(host: StoreHost) -> dict[str, int]:
    return {k: v["Count"] for k, v in host.report()["Plugin"]["Calls"].items()}


def established(host: StoreHost) -> set[str]:
    router = host.report()["Router"]
    me = next((p for p in router["Peers"] if p["Name"] == router["Name"]), {"Connections": []})
    return {c["NickName"] for c in me["Connections"] if c.get("Established")}


def meshed(lab: ClusterStoreLab) -> bool:
    """Each router has an established connection with the other: both sides, one look each."""
    a, b = lab.hosts
    return established(a) == {f"{lab.tag}-b"} and established(b) == {f"{lab.tag}-a"}


def start_global_network(lab: ClusterStoreLab) -> tuple[str, str, str, str]:
    a, b = lab.hosts
    a.docker("network", "create", "-d", "weave", "--subnet", SUBNET, "gnet")
    listed = wait_for(
        lambda: "gnet weave global" in b.docker("network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}").stdout,
        timeout=10,
        what="host b to list gnet",
    )
    assert listed
    began = time.monotonic()
    a.docker("run", "-d", "--init", "--name", "ca", "--network", "gnet", "busybox", "sleep", "600")
    b.docker("run", "-d", "--init", "--name", "cb", "--network", "gnet", "busybox", "sleep", "600")
    print(f"docker run on a and b: {time.monotonic() - began:.2f}s")
    return "ca", ethwe(a, "ca"), "cb", ethwe(b, "cb")


def test_global_network_across_two_daemons_with_a_cluster_store(store_lab: ClusterStoreLab):
    a, b = store_lab.hosts
    _, ca_ip, _, cb_ip = start_global_network(store_lab)

    # Docker's global IPAM (in the store): distinct addresses in the network's subnet
    assert ca_ip != cb_ip and ca_ip.endswith("/24") and cb_ip.endswith("/24")
    assert ca_ip.startswith("10.231.0.") and cb_ip.startswith("10.231.0.")

    # a created the network; b never gets CreateNetwork (C1) yet plugs its container in
    a_calls, b_calls = calls(a), calls(b)
    assert a_calls.get("NetworkDriver.CreateNetwork") == 1
    assert "NetworkDriver.CreateNetwork" not in b_calls
    assert b_calls.get("NetworkDriver.CreateEndpoint") == 1 and b_calls.get("NetworkDriver.Join") == 1
    wait_for(  # node discovery runs on the store's heartbeat, not with the containers' calls
        lambda: calls(a).get("NetworkDriver.DiscoverNew", 0) >= 2,  # itself and b
        timeout=30,
        what=lambda: (
            f"a's Docker to announce itself and b (DiscoverNew so far: {calls(a).get('NetworkDriver.DiscoverNew', 0)})"
        ),
    )
    gnet = [n for n in b.report()["Plugin"]["Networks"] if n["Driver"] == "weave"]
    assert gnet and gnet[0]["Pools"] == [SUBNET]  # learned from b's Docker, not from CreateNetwork

    # Docker's node discovery introduced the routers: no peers were given at launch
    wait_for(lambda: meshed(store_lab), timeout=20, what="a's and b's routers to connect to each other")

    # the rest of the user's view: same-host traffic, names across hosts, teardown rules
    a.docker("run", "-d", "--init", "--name", "ca2", "--network", "gnet", "busybox", "sleep", "600")
    reaches(a, "ca2", ca_ip.split("/")[0])
    wait_for(  # a learns of b's endpoint through the store
        lambda: '"Name": "cb"' in a.docker("network", "inspect", "gnet").stdout,
        timeout=30,
        what="a's Docker to show b's container cb on gnet",
    )
    refused = b.docker("network", "rm", "gnet", check=False)
    assert refused.returncode != 0 and "active endpoints" in refused.stderr

    for host, names in ((a, ["ca", "ca2"]), (b, ["cb"])):
        host.docker("rm", "-f", *names)
        assert not [line for line in host.inside("ip", "-o", "link").stdout.splitlines() if "vethw" in line]
    a.docker("network", "rm", "gnet")
    wait_for(  # b learns of the removal through the store
        lambda: "gnet" not in b.docker("network", "ls", "--format", "{{.Name}}").stdout.split(),
        timeout=30,
        what="b's Docker to drop gnet once a removed it",
    )
    assert not [n for n in a.report()["Plugin"]["Networks"] if n["Driver"] == "weave"]


def datapath_links(host: StoreHost) -> list[str]:
    """The router's connections that run over the Rust datapath (`fastdp`), by peer nickname."""
    connections = host.report()["Router"]["Connections"]
    return [c["Info"] for c in connections if (c.get("Attrs") or {}).get("name") == "fastdp"]


def test_global_network_containers_ping_across_hosts_through_the_mesh(store_lab: ClusterStoreLab):
    """Through weavenet itself: the ping works both ways and by name, fails while the mesh port is
    cut between the hosts, and returns when it is healed."""
    a, b = store_lab.hosts
    for host in (a, b):  # each host's router runs the datapath: its TAP is a port of the weave bridge
        tap = host.inside("ip", "-d", "-o", "link", "show", "weave-dp").stdout
        assert " tun " in tap and "master weave" in tap, tap
    ca, ca_ip, cb, cb_ip = start_global_network(store_lab)
    wait_for(
        lambda: meshed(store_lab) and len(datapath_links(a)) == 1 and len(datapath_links(b)) == 1,
        timeout=20,
        what=lambda: (
            f"the mesh between a and b, both ways, over the datapath ({datapath_links(a)}, {datapath_links(b)})"
        ),
    )
    began = time.monotonic()
    reaches(a, ca, cb_ip.split("/")[0])
    print(f"first cross-host ping through the mesh: {time.monotonic() - began:.2f}s")
    reaches(b, cb, ca_ip.split("/")[0])
    reaches(b, cb, ca)  # by name: Docker's embedded DNS, fed from the store

    # cut the mesh port (TCP control and UDP data) between the hosts; etcd stays reachable
    rules = [["INPUT", "-p", proto, "--dport", "6783", "-j", "DROP"] for proto in ("udp", "tcp")]
    for host in (a, b):
        for rule in rules:
            host.inside("iptables", "-I", *rule)
    began = time.monotonic()
    wait_for(lambda: not pings(a, ca, cb_ip.split("/")[0]), timeout=30, what="the ping to fail with the mesh cut")
    assert not pings(b, cb, ca_ip.split("/")[0])
    for host in (a, b):
        for rule in rules:
            host.inside("iptables", "-D", *rule)
    reaches(a, ca, cb_ip.split("/")[0], timeout=60)  # the mesh reconnects after the cut
    print(f"cut, then healed and pinging again: {time.monotonic() - began:.2f}s")
    reaches(b, cb, ca_ip.split("/")[0])
    a.docker("rm", "-f", ca)
    b.docker("rm", "-f", cb)
    a.docker("network", "rm", "gnet")
