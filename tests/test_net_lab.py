"""Host plumbing in a lab host: the weave bridge, attaching container namespaces, firewall rules.

All of it runs inside lab namespaces (see tests/netns_context.py), never on the machine's own network.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

import pytest
from pyroute2 import IPRoute

from tests.lab import Lab
from tests.netns_context import inside
from weavenet.net import bridge, firewall, sysctl
from weavenet.net.attach import CONTAINER_IFNAME, attach, detach, inspect
from weavenet.net.netns import Namespace, TargetError, resolve

pytestmark = pytest.mark.lab(hosts=1)


def ping(ns, address: str) -> bool:
    return ns.run(["ping", "-c1", "-W1", address], check=False).returncode == 0


def routes_of(ns) -> list[str]:
    return ns.run(["ip", "-4", "route", "show"]).stdout.splitlines()


def test_the_bridge_is_created_once_with_our_settings(lab: Lab):
    host = lab.hosts[0]
    with inside(host):
        first = bridge.ensure_bridge(mtu=1400)
        again = bridge.ensure_bridge(mtu=1376)
        assert first == again
        with IPRoute() as ipr:
            link = ipr.get_links(first)[0]
            assert link.get("IFLA_MTU") == 1376
            assert link.get("IFLA_OPERSTATE") in ("UP", "UNKNOWN")
            info = link.get(("IFLA_LINKINFO", "IFLA_INFO_DATA"))
            assert info.get("IFLA_BR_MCAST_SNOOPING") == 0
        assert sysctl.read("net/ipv6/conf/weave/accept_ra") == "0"


def test_attached_containers_reach_each_other_across_the_bridge(lab: Lab):
    host = lab.hosts[0]
    c1, c2 = host.add_container("c1"), host.add_container("c2")
    with inside(host):
        bridge.ensure_bridge(mtu=1400)
        one = attach(resolve(c1.path), [IPv4Interface("10.40.0.1/24")], mtu=1400)
        two = attach(resolve(c2.path), [IPv4Interface("10.40.0.2/24")], mtu=1400)
        assert sorted(bridge.bridge_ports()) == sorted([one.host_ifname, two.host_ifname])
    assert one.cidrs == (IPv4Interface("10.40.0.1/24"),)
    c1.wait_reachable("10.40.0.2")  # fresh veths: the bridge ports come up asynchronously
    assert any(line.startswith("224.0.0.0/4 dev ethwe0") for line in routes_of(c1))
    assert " mtu 1400 " in c1.run(["ip", "-o", "link", "show", CONTAINER_IFNAME]).stdout
    # Attaching again adds an address to the same interface; detaching one keeps the other.
    with inside(host):
        attach(resolve(c1.path), [IPv4Interface("10.41.0.1/24")], mtu=1400)
        seen = inspect(resolve(c1.path))
        assert seen is not None and set(seen.cidrs) == {IPv4Interface("10.40.0.1/24"), IPv4Interface("10.41.0.1/24")}
        assert detach(resolve(c1.path), [IPv4Interface("10.41.0.1/24")]) == [IPv4Interface("10.41.0.1/24")]
        assert inspect(resolve(c1.path)) is not None
        assert detach(resolve(c1.path)) == [IPv4Interface("10.40.0.1/24")]
        assert inspect(resolve(c1.path)) is None
        assert one.host_ifname not in bridge.bridge_ports(), "the veth goes with its last address"
    assert not ping(c2, "10.40.0.1")


def test_no_multicast_route_when_asked(lab: Lab):
    host = lab.hosts[0]
    c1 = host.add_container("c1")
    with inside(host):
        bridge.ensure_bridge(mtu=1400)
        attach(resolve(c1.path), [IPv4Interface("10.40.0.1/24")], mtu=1400, multicast_route=False)
    assert not any(line.startswith("224.0.0.0/4") for line in routes_of(c1))


def test_a_failed_attach_leaves_nothing_behind(lab: Lab):
    host = lab.hosts[0]
    c1 = host.add_container("c1")
    with inside(host):
        bridge.ensure_bridge(mtu=1400)
        with pytest.raises(bridge.PlumbingError):
            attach(resolve(c1.path), [IPv4Interface("10.40.0.1/24")], mtu=1400, bridge="nosuchbridge")
        assert not any(name.startswith("vethwepl") for name in host.links())
    assert CONTAINER_IFNAME not in c1.links()


def test_forwarding_rules_beat_a_drop_policy(lab: Lab):
    host = lab.hosts[0]
    c1, c2 = host.add_container("c1"), host.add_container("c2")
    with inside(host):
        bridge.ensure_bridge(mtu=1400)
        attach(resolve(c1.path), [IPv4Interface("10.40.0.1/24")], mtu=1400)
        attach(resolve(c2.path), [IPv4Interface("10.40.0.2/24")], mtu=1400)
    if host.run(["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"], check=False).stdout.strip() != "1":
        pytest.skip("br_netfilter is not active in this namespace, so FORWARD never sees bridged frames")
    # Fresh veths come up asynchronously: first see traffic flow, so the "dies" below means the policy.
    c1.wait_reachable("10.40.0.2")
    # What Docker does to a host: FORWARD policy DROP. Bridged container traffic then dies...
    host.run(["iptables", "-P", "FORWARD", "DROP"])
    assert not ping(c1, "10.40.0.2")
    # ...until weavenet's rule lets the bridge forward; applying it twice adds nothing.
    with inside(host):
        firewall.allow_bridge_forwarding("weave")
        firewall.allow_bridge_forwarding("weave")
    c1.wait_reachable("10.40.0.2")
    rules = host.run(["iptables", "-S"]).stdout
    assert rules.count("-A FORWARD -j WEAVENET-FORWARD") == 1
    with inside(host):
        firewall.remove_all()
    assert "WEAVENET" not in host.run(["iptables", "-S"]).stdout
    assert not ping(c1, "10.40.0.2")


def test_expose_lets_the_host_reach_containers(lab: Lab):
    host = lab.hosts[0]
    c1 = host.add_container("c1")
    subnet = IPv4Network("10.40.0.0/24")
    with inside(host):
        bridge.ensure_bridge(mtu=1400)
        attach(resolve(c1.path), [IPv4Interface("10.40.0.5/24")], mtu=1400)
    assert not ping(host, "10.40.0.5")
    host.add_address("weave", "10.40.0.254/24")
    with inside(host):
        firewall.expose("weave", subnet)
    host.wait_reachable("10.40.0.5")  # the container's veth is fresh
    assert "WEAVENET-NAT" in host.run(["iptables", "-t", "nat", "-S"]).stdout
    with inside(host):
        firewall.hide("weave", subnet)
    assert "MASQUERADE" not in host.run(["iptables", "-t", "nat", "-S", "WEAVENET-NAT"]).stdout


def test_targets_resolve_to_namespaces_or_fail_clearly(lab: Lab):
    c1 = lab.hosts[0].add_container("c1")
    assert resolve(c1.path) == Namespace(path=c1.path, ident=f"netns:{c1.name}")
    assert resolve(c1.name).path == c1.path
    assert resolve("abc", lambda name: ("abc" * 20, 4242)).ident == "abc" * 20
    with pytest.raises(TargetError, match="no such container or network namespace"):
        resolve("wn-no-such-thing")
    with pytest.raises(TargetError, match="is not running"):
        resolve("stopped", lambda name: ("f" * 64, 0))
