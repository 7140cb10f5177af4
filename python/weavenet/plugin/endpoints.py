"""Host plumbing for Docker endpoints: the veth pair Docker moves into a container.

CreateEndpoint makes `vethwl<9>` (host side, a port of the weave bridge, up, with the bridge's
MTU) and `vethwg<9>` (the other end: down, unaddressed, in the host namespace) from the endpoint
id, as Weave Net named them; Docker moves `vethwg…` into the container at Join and renames it
`ethwe<n>`. DeleteEndpoint removes the pair. A failure midway removes what was made, so nothing
half-created is left. Synchronous netlink calls, quick but blocking: callers run them in a thread
(`trio.to_thread`), never on the trio loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weavenet.net import sysctl
from weavenet.net.bridge import BRIDGE_NAME, PlumbingError, delete_link, link_index

log = logging.getLogger(__name__)

HOST_PREFIX = "vethwl"
GUEST_PREFIX = "vethwg"
CONTAINER_PREFIX = "ethwe"
ID_CHARS = 15 - len(HOST_PREFIX)  # IFNAMSIZ 16 - NUL: 9 characters of the endpoint id
OLD_ID_CHARS = 5  # Weave Net before 2016 named host ends vethwl<5>
MULTICAST_ROUTE = IPv4Network("224.0.0.0/4")


class EndpointExists(PlumbingError):
    """CreateEndpoint for an id whose veth already exists."""


def host_ifname(endpoint_id: str) -> str:
    return HOST_PREFIX + endpoint_id[:ID_CHARS]


def guest_ifname(endpoint_id: str) -> str:
    return GUEST_PREFIX + endpoint_id[:ID_CHARS]


def bridge_present(bridge: str = BRIDGE_NAME) -> bool:
    with IPRoute() as ipr:
        return link_index(ipr, bridge) is not None


def create_endpoint(endpoint_id: str, *, mac: str | None = None, bridge: str = BRIDGE_NAME) -> str:
    """Make the veth pair for an endpoint, host end on the bridge. Returns the container end's MAC."""
    host, guest = host_ifname(endpoint_id), guest_ifname(endpoint_id)
    with IPRoute() as ipr:
        bridge_index = link_index(ipr, bridge)
        if bridge_index is None:
            raise PlumbingError(f'bridge "{bridge}" not present; is the weavenet router running?')
        mtu = int(ipr.get_links(bridge_index)[0].get("IFLA_MTU"))
        try:
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": guest}, mtu=mtu)
        except NetlinkError as exc:
            if exc.code == 17:  # EEXIST
                raise EndpointExists(f"endpoint {endpoint_id[:12]} already exists (interface {host})") from None
            raise PlumbingError(f"could not create veth pair {host}-{guest}: {os.strerror(exc.code)}") from None
        try:
            host_index = link_index(ipr, host)
            guest_index = link_index(ipr, guest)
            if host_index is None or guest_index is None:
                raise PlumbingError(f"veth pair {host}-{guest} vanished right after creation")
            sysctl.quiet_ipv6(host)
            sysctl.quiet_ipv6(guest)
            guest_settings: dict[str, object] = {"mtu": mtu}
            if mac:
                guest_settings["address"] = mac
            ipr.link("set", index=guest_index, **guest_settings)
            ipr.link("set", index=host_index, master=bridge_index, mtu=mtu, state="up")
            return str(ipr.get_links(guest_index)[0].get("IFLA_ADDRESS"))
        except NetlinkError as exc:
            _remove_quietly(host)
            raise PlumbingError(f"could not set up veth pair {host}-{guest}: {os.strerror(exc.code)}") from None
        except BaseException:
            _remove_quietly(host)
            raise


def _remove_quietly(ifname: str) -> None:
    try:
        delete_link(ifname)
    except PlumbingError as exc:
        log.warning("cleanup after a failed CreateEndpoint: %s", exc)


def endpoint_ready(endpoint_id: str) -> bool:
    """Is the container end still in the host namespace, ready for Docker to move it?"""
    with IPRoute() as ipr:
        return link_index(ipr, guest_ifname(endpoint_id)) is not None


def delete_endpoint(endpoint_id: str) -> bool:
    """Remove the endpoint's veth (both ends go). False if it was already gone."""
    if delete_link(host_ifname(endpoint_id)):
        return True
    return delete_link(HOST_PREFIX + endpoint_id[:OLD_ID_CHARS])


def sweep_abandoned() -> list[str]:
    """Remove the veth pairs Docker gave up on while no plugin answered; returns their host ends.

    A container removed while the plugin is down (or disabled) gets Docker's Leave and DeleteEndpoint
    retried for 15 s each and then dropped; Docker moves the container end back out of the dead
    sandbox under its own name, so the pair stays, both ends here, the host end on the bridge. Only
    at start, before the sockets serve: then no CreateEndpoint of ours is waiting for its Join (one
    answered by a process that died just before the Join fails that container's start cleanly).
    A joined endpoint's container end is in the container, never here, so it is never touched."""
    swept = []
    with IPRoute() as ipr:
        names = {str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}
    for name in sorted(names):
        tail = name.removeprefix(HOST_PREFIX)
        if tail != name and GUEST_PREFIX + tail in names and delete_link(name):
            swept.append(name)
    return swept


def sandbox_has_route(sandbox_key: str, network: IPv4Network = MULTICAST_ROUTE) -> bool | None:
    """Does the container's namespace (Join's SandboxKey) already route `network`? None if unreadable."""
    if not sandbox_key or not os.path.exists(sandbox_key):
        return None
    try:
        with IPRoute(netns=sandbox_key) as inside:
            for route in inside.get_routes(family=2):
                if route.get("RTA_DST") == str(network.network_address) and route["dst_len"] == network.prefixlen:
                    return True
    except (OSError, NetlinkError) as exc:
        log.debug("cannot read routes of sandbox %s: %s", sandbox_key, exc)
        return None
    return False


@dataclass(frozen=True)
class PluginInterface:
    """A container interface whose host end is a plugin veth on the bridge (for reclaim and ps)."""

    host_ifname: str
    ifname: str
    mac: str
    cidrs: tuple[IPv4Interface, ...]


def plugin_interfaces(netns_path: str, bridge: str = BRIDGE_NAME) -> list[PluginInterface]:
    """Interfaces in a namespace whose veth peer is a `vethwl…` port of the bridge (matched by index)."""
    with IPRoute() as host:
        bridge_index = link_index(host, bridge)
        if bridge_index is None:
            return []
        ports = {
            int(link["index"]): str(link.get("IFLA_IFNAME"))
            for link in host.get_links()
            if link.get("IFLA_MASTER") == bridge_index and str(link.get("IFLA_IFNAME")).startswith(HOST_PREFIX)
        }
    if not ports:
        return []
    found: list[PluginInterface] = []
    try:
        with IPRoute(netns=netns_path) as inside:
            for link in inside.get_links():
                peer = link.get("IFLA_LINK")
                if peer is None or int(peer) not in ports or link.get("IFLA_LINKINFO") is None:
                    continue
                if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
                    continue
                index = int(link["index"])
                cidrs = tuple(
                    sorted(
                        IPv4Interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}")
                        for addr in inside.get_addr(index=index, family=2)
                    )
                )
                found.append(
                    PluginInterface(
                        host_ifname=ports[int(peer)],
                        ifname=str(link.get("IFLA_IFNAME")),
                        mac=str(link.get("IFLA_ADDRESS")),
                        cidrs=cidrs,
                    )
                )
    except (OSError, NetlinkError) as exc:
        log.debug("cannot read interfaces of %s: %s", netns_path, exc)
        return []
    return found
