"""Attaching a network namespace (a container) to the `weave` bridge with a veth pair.

Host side `vethwepl<tag>` on the bridge, namespace side `ethwe0` with the given addresses and,
unless told otherwise, the multicast route 224.0.0.0/4. Attaching again adds addresses; detaching
removes them and, when none is left, the interface. On any failure midway the veth is removed,
so nothing half-made is left behind.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weavenet.net.bridge import BRIDGE_NAME, PlumbingError, attach_port, delete_link, link_index
from weavenet.net.netns import Namespace, opened

log = logging.getLogger(__name__)

CONTAINER_IFNAME = "ethwe0"
HOST_PREFIX = "vethwepl"
MULTICAST_ROUTE = IPv4Network("224.0.0.0/4")


@dataclass(frozen=True)
class Attachment:
    ident: str
    ns_path: str
    host_ifname: str
    mac: str
    cidrs: tuple[IPv4Interface, ...]


def random_mac() -> str:
    """Locally administered unicast MAC."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] | 0x02) & 0xFE
    return ":".join(f"{b:02x}" for b in raw)


def host_ifname(ns: Namespace) -> str:
    return HOST_PREFIX + ns.short_id(15 - len(HOST_PREFIX))


def _addresses(ipr: IPRoute, index: int) -> set[IPv4Interface]:
    found = set()
    for addr in ipr.get_addr(index=index, family=2):
        found.add(IPv4Interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}"))
    return found


def attach(
    ns: Namespace,
    cidrs: list[IPv4Interface],
    *,
    mtu: int,
    bridge: str = BRIDGE_NAME,
    multicast_route: bool = True,
) -> Attachment:
    host_name = host_ifname(ns)
    with opened(ns) as ns_fd, IPRoute(netns=ns.path) as inside:
        index = link_index(inside, CONTAINER_IFNAME)
        created = False
        if index is None:
            temp_name = "wnt" + secrets.token_hex(5)
            with IPRoute() as host:
                if link_index(host, host_name) is not None:
                    delete_link(host_name)  # a stale host end whose namespace is gone
                try:
                    host.link("add", ifname=host_name, kind="veth", peer={"ifname": temp_name, "net_ns_fd": ns_fd})
                except NetlinkError as exc:
                    raise PlumbingError(f"cannot create veth {host_name}: {exc}") from exc
            created = True
            try:
                attach_port(host_name, bridge=bridge, mtu=mtu)
                temp_index = link_index(inside, temp_name)
                if temp_index is None:
                    raise PlumbingError(f"veth end {temp_name} did not appear in {ns.path}")
                inside.link("set", index=temp_index, ifname=CONTAINER_IFNAME, mtu=mtu, address=random_mac(), state="up")
                index = temp_index
            except BaseException:
                delete_link(host_name)
                raise
        lo = link_index(inside, "lo")
        if lo is not None:
            inside.link("set", index=lo, state="up")
        try:
            present = _addresses(inside, index)
            for cidr in cidrs:
                if cidr not in present:
                    inside.addr("add", index=index, address=str(cidr.ip), prefixlen=cidr.network.prefixlen)
            if multicast_route and not _has_route(inside, MULTICAST_ROUTE):
                inside.route("add", dst=str(MULTICAST_ROUTE), oif=index)
        except NetlinkError as exc:
            if created:
                delete_link(host_name)
            raise PlumbingError(f"cannot configure {CONTAINER_IFNAME} in {ns.path}: {exc}") from exc
        link = inside.get_links(index)[0]
        mac = str(link.get("IFLA_ADDRESS"))
        addresses = tuple(sorted(_addresses(inside, index)))
    log.info("attached %s (%s) with %s", ns.ident, host_name, ", ".join(map(str, addresses)))
    return Attachment(ns.ident, ns.path, host_name, mac, addresses)


def _has_route(ipr: IPRoute, network: IPv4Network) -> bool:
    for route in ipr.get_routes(family=2):
        if route.get("RTA_DST") == str(network.network_address) and route["dst_len"] == network.prefixlen:
            return True
    return False


def detach(ns: Namespace, cidrs: list[IPv4Interface] | None = None) -> list[IPv4Interface]:
    """Remove the given addresses (all if None); remove ethwe0 when none is left. Returns what was removed."""
    with IPRoute(netns=ns.path) as inside:
        index = link_index(inside, CONTAINER_IFNAME)
        if index is None:
            return []
        present = _addresses(inside, index)
        doomed = present if cidrs is None else present & set(cidrs)
        for cidr in doomed:
            inside.addr("del", index=index, address=str(cidr.ip), prefixlen=cidr.network.prefixlen)
        if not present - doomed:
            inside.link("del", index=index)
    return sorted(doomed)


def inspect(ns: Namespace) -> Attachment | None:
    """What is attached in this namespace now (for `weavenet ps`), or None."""
    try:
        with IPRoute(netns=ns.path) as inside:
            index = link_index(inside, CONTAINER_IFNAME)
            if index is None:
                return None
            mac = str(inside.get_links(index)[0].get("IFLA_ADDRESS"))
            addresses = tuple(sorted(_addresses(inside, index)))
    except OSError:
        return None
    return Attachment(ns.ident, ns.path, host_ifname(ns), mac, addresses)
