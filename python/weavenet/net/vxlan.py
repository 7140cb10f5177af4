"""The kernel fast path's plumbing: one VXLAN port on the `weave` bridge and its forwarding entries.

The device (`vxlan-<port>`, one VNI, learning off, DF set, MTU = underlay − 50) is a port of the
bridge that never floods: broadcasts, multicast and unknown unicast reach peers only through the
Rust datapath's TAP. Both the VXLAN port and the TAP are `isolated`, so the bridge never forwards a
frame from one overlay into the other (no loops, no frame delivered twice). Unicast takes the kernel
path only for a MAC the router has pinned here: a `master static sticky` bridge entry (learning on
the TAP cannot move it) plus a `self` entry on the device with the peer's underlay address and port.
Nothing here decides anything; pyroute2 netlink only. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NTF_SELF, NTF_STICKY

from weavenet.net import sysctl
from weavenet.net.bridge import BRIDGE_NAME, PlumbingError, link_index

log = logging.getLogger(__name__)

DEVICE_PREFIX = "vxlan-"  # Weave Net named its OVS VXLAN port vxlan-6784 too
VNI = 0x77656E  # one segment for the whole mesh ("wen"); never on the wire of anything else of ours
OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
NUD_NOARP = 0x40  # `static`: forwarded, never aged (NUD_PERMANENT on a bridge entry would mean "local")
NUD_PERMANENT = 0x80
AF_BRIDGE = 7


class PortInUse(PlumbingError):
    """The VXLAN UDP port is taken by another socket on this host."""


def device_name(port: int) -> str:
    return f"{DEVICE_PREFIX}{port}"


@dataclass(frozen=True)
class Remote:
    """Where the device sends a MAC: a peer's underlay address and kernel port."""

    address: str
    port: int


def _require(ipr: IPRoute, ifname: str) -> int:
    index = link_index(ipr, ifname)
    if index is None:
        raise PlumbingError(f"{ifname} does not exist")
    return index


def open_device(port: int, *, mtu: int, local: str | None = None, bridge: str = BRIDGE_NAME) -> int:
    """A fresh device on the bridge (stale ones, with whatever entries a killed router left, on this
    port or another, are deleted first). Returns its index. PortInUse if the UDP port is taken."""
    name = device_name(port)
    for stale in {port, *stale_devices(bridge=bridge)}:
        if close_device(stale) and stale != port:
            log.info("kernel path: removed %s, left by a router that was killed", device_name(stale))
    spec: dict[str, object] = {"vxlan_id": VNI, "vxlan_port": port, "vxlan_learning": 0, "vxlan_df": 1}
    if local:
        spec["vxlan_local"] = local
    with IPRoute() as ipr:
        bridge_index = _require(ipr, bridge)
        try:
            ipr.link("add", ifname=name, kind="vxlan", **spec)
        except NetlinkError as exc:
            raise PlumbingError(f"cannot create {name}: {os.strerror(exc.code)}") from None
        index = _require(ipr, name)
        try:
            sysctl.quiet_ipv6(name)
            ipr.link("set", index=index, mtu=mtu, master=bridge_index)
            ipr.brport("set", index=index, learning=0, unicast_flood=0, mcast_flood=0, bcast_flood=0, isolated=1)
            ipr.link("set", index=index, state="up")  # binds the UDP port
        except NetlinkError as exc:
            ipr.link("del", index=index)
            if exc.code == errno.EADDRINUSE:
                raise PortInUse(f"VXLAN port {port} in use") from None
            raise PlumbingError(f"cannot set up {name}: {os.strerror(exc.code)}") from None
    log.info("kernel path: %s on %s (UDP %d, VNI %#x, MTU %d)", name, bridge, port, VNI, mtu)
    return index


def close_device(port: int) -> bool:
    """Delete the device (its entries go with it). True if it was there."""
    with IPRoute() as ipr:
        index = link_index(ipr, device_name(port))
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise PlumbingError(f"cannot delete {device_name(port)}: {os.strerror(exc.code)}") from None
    return True


def _our_vni(link: Any) -> bool:  # a pyroute2 ifinfmsg
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return data is not None and data.get_attr("IFLA_VXLAN_ID") == VNI


def stale_devices(*, bridge: str = BRIDGE_NAME) -> list[int]:
    """Ports of our VXLAN devices (our name and VNI) on the bridge or on no bridge: what a killed
    router left, whatever port it used. A new router sweeps them before it opens its own (one bridge,
    one router per namespace), and `weavenet reset` does too. A device of our VNI on another bridge is
    someone else's and stays."""
    found = []
    with IPRoute() as ipr:
        bridge_index = link_index(ipr, bridge)
        for link in ipr.get_links():
            name = str(link.get_attr("IFLA_IFNAME"))
            tail = name.removeprefix(DEVICE_PREFIX)
            master = link.get_attr("IFLA_MASTER")
            if tail != name and tail.isdigit() and master in (None, bridge_index) and _our_vni(link):
                found.append(int(tail))
    return found


def isolate_port(ifname: str) -> None:
    """Mark another overlay port (the TAP) isolated, so it never exchanges frames with the VXLAN port."""
    with IPRoute() as ipr:
        ipr.brport("set", index=_require(ipr, ifname), isolated=1)


# The forwarding entries: batches of these run in one netlink session (`with IPRoute() as ipr`).


def pin(ipr: IPRoute, port: int, mac: str, remote: Remote) -> None:
    """Send `mac` through the kernel path to `remote` (replacing whatever the bridge had for it)."""
    index = _require(ipr, device_name(port))
    ipr.fdb("replace", ifindex=index, lladdr=mac, dst=remote.address, port=remote.port, flags=NTF_SELF,
            state=NUD_PERMANENT | NUD_NOARP)  # fmt: skip
    ipr.fdb("replace", ifindex=index, lladdr=mac, flags=NTF_MASTER | NTF_STICKY, state=NUD_NOARP)


def unpin(ipr: IPRoute, port: int, mac: str) -> None:
    """Take `mac` off the kernel path: the bridge learns it on the TAP again."""
    index = link_index(ipr, device_name(port))
    if index is None:
        return
    for flags in (NTF_MASTER, NTF_SELF):
        try:
            ipr.fdb("del", ifindex=index, lladdr=mac, flags=flags)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise PlumbingError(f"cannot remove {mac} from {device_name(port)}: {exc}") from None


def pinned(ipr: IPRoute, port: int) -> dict[str, Remote]:
    """What the device forwards now: MACs with both a bridge entry on the port and a remote."""
    bridged: set[str] = set()
    remotes: dict[str, Remote] = {}
    index = link_index(ipr, device_name(port))
    if index is None:
        return {}
    for entry in ipr.fdb("dump", ifindex=index):
        if entry.get("ifindex") != index:
            continue
        mac = str(entry.get_attr("NDA_LLADDR"))
        if entry["flags"] & NTF_SELF:
            if (dst := entry.get_attr("NDA_DST")) is not None:
                remotes[mac] = Remote(str(dst), int(entry.get_attr("NDA_PORT") or port))
        elif entry.get_attr("NDA_MASTER") is not None and entry["state"] & NUD_NOARP:
            bridged.add(mac)
    return {mac: remote for mac, remote in remotes.items() if mac in bridged}


def local_macs(ipr: IPRoute, overlay_ports: set[str], *, bridge: str = BRIDGE_NAME) -> set[str]:
    """The unicast MACs that live on this host: learned on the bridge's other ports (containers,
    attached namespaces) and the bridge's own (the host, once exposed)."""
    bridge_index = link_index(ipr, bridge)
    if bridge_index is None:
        return set()
    skip = {bridge_index} | {i for name in overlay_ports if (i := link_index(ipr, name)) is not None}
    found = {str(ipr.get_links(bridge_index)[0].get_attr("IFLA_ADDRESS"))}
    for entry in ipr.fdb("dump"):
        if entry.get_attr("NDA_MASTER") != bridge_index or entry.get("ifindex") in skip:
            continue
        if entry["state"] & NUD_PERMANENT or entry["flags"] & NTF_SELF:
            continue  # a port's own address, or the port's multicast list
        mac = str(entry.get_attr("NDA_LLADDR"))
        if not int(mac[:2], 16) & 1:
            found.add(mac)
    return found


def add_local(ipr: IPRoute, mac: str, *, bridge: str = BRIDGE_NAME) -> None:
    """Deliver frames for `mac` to the bridge's own stack (the heartbeat socket), never to a port."""
    ipr.fdb("replace", ifindex=_require(ipr, bridge), lladdr=mac, flags=NTF_SELF, state=NUD_PERMANENT)


def remove_local(ipr: IPRoute, mac: str, *, bridge: str = BRIDGE_NAME) -> None:
    index = link_index(ipr, bridge)
    if index is None:
        return
    try:
        ipr.fdb("del", ifindex=index, lladdr=mac, flags=NTF_SELF)
    except NetlinkError as exc:
        if exc.code != errno.ENOENT:
            raise PlumbingError(f"cannot remove {mac} from {bridge}: {exc}") from None


@dataclass(frozen=True)
class PortStats:
    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0


def port_stats(ipr: IPRoute, port: int) -> PortStats:
    """The device's counters (frames it decapsulated and encapsulated); zeros if it is gone."""
    index = link_index(ipr, device_name(port))
    if index is None:
        return PortStats()
    stats = ipr.get_links(index)[0].get_attr("IFLA_STATS64")
    if stats is None:
        return PortStats()
    return PortStats(int(stats["rx_packets"]), int(stats["rx_bytes"]), int(stats["tx_packets"]), int(stats["tx_bytes"]))
