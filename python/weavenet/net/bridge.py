"""The `weave` bridge: created once per host, ports attached with the bridge's MTU.

Idempotent: ensuring an existing bridge only corrects its settings. Runs in the caller's
network namespace; never touches links it did not create except to attach them as ports.
"""

from __future__ import annotations

import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weavenet.net import sysctl

log = logging.getLogger(__name__)

BRIDGE_NAME = "weave"


class PlumbingError(Exception):
    """A host networking operation failed; the message says which and why."""


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def link_mtu(ipr: IPRoute, ifname: str) -> int | None:
    index = link_index(ipr, ifname)
    if index is None:
        return None
    return int(ipr.get_links(index)[0].get("IFLA_MTU"))


def ensure_bridge(name: str = BRIDGE_NAME, *, mtu: int) -> int:
    """Create (or correct) the bridge: up, given MTU, multicast flooded, IPv6 RA off. Returns its index."""
    with IPRoute() as ipr:
        index = link_index(ipr, name)
        if index is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: someone else created it meanwhile
                    raise PlumbingError(f"cannot create bridge {name}: {exc}") from exc
            index = link_index(ipr, name)
            if index is None:
                raise PlumbingError(f"bridge {name} vanished right after creation")
            log.info("created bridge %s", name)
        sysctl.quiet_ipv6(name)
        try:
            # Without snooping the bridge floods multicast to every port: what an overlay of
            # containers expects (Weave Net did the same).
            ipr.link("set", index=index, kind="bridge", br_mcast_snooping=0)
        except NetlinkError as exc:
            log.debug("bridge %s: multicast snooping not switched off: %s", name, exc)
        ipr.link("set", index=index, mtu=mtu, state="up")
        return index


def attach_port(ifname: str, *, bridge: str = BRIDGE_NAME, mtu: int | None = None) -> None:
    """Put an interface on the bridge with the bridge's MTU (or `mtu`), and bring it up."""
    with IPRoute() as ipr:
        bridge_index = link_index(ipr, bridge)
        port_index = link_index(ipr, ifname)
        if bridge_index is None:
            raise PlumbingError(f"bridge {bridge} does not exist")
        if port_index is None:
            raise PlumbingError(f"interface {ifname} does not exist")
        if mtu is None:
            mtu = int(ipr.get_links(bridge_index)[0].get("IFLA_MTU"))
        sysctl.quiet_ipv6(ifname)
        ipr.link("set", index=port_index, master=bridge_index, mtu=mtu, state="up")


def delete_link(ifname: str) -> bool:
    """Remove an interface if it exists (a veth takes its peer with it). True if it was there."""
    with IPRoute() as ipr:
        index = link_index(ipr, ifname)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: gone meanwhile
                return False
            raise PlumbingError(f"cannot delete {ifname}: {exc}") from exc
        return True


def bridge_ports(bridge: str = BRIDGE_NAME) -> list[str]:
    with IPRoute() as ipr:
        index = link_index(ipr, bridge)
        if index is None:
            return []
        return [str(link.get("IFLA_IFNAME")) for link in ipr.get_links() if link.get("IFLA_MASTER") == index]
