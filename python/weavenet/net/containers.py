"""Attaching containers and namespaces to the overlay: `weavenet attach/detach/expose/hide/ps`.

This is the service behind those commands: it turns a target into a namespace, gets addresses from
IPAM (or claims the ones given), plumbs the veth through `net.attach`, and remembers what it did
(in the store) so `ps` can list it and a restarted router can reclaim the addresses. Netlink work
is blocking, so it runs in a worker thread; never on the trio loop. A failure undoes what the
call did: addresses allocated for it are freed again, and no veth is left half-made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any

import trio

from weavenet.net import attach as plumbing
from weavenet.net import bridge, firewall
from weavenet.net.netns import Namespace, TargetError, resolve
from weavenet.plugin.docker_api import DockerClient, DockerError

if TYPE_CHECKING:
    from weavenet.ipam.allocator import Allocator

log = logging.getLogger(__name__)

EXPOSE_IDENT = "weave:expose"
_STORE_KEY = "attachments"


class AttachError(Exception):
    """A one-line reason the attach/detach/expose request could not be done."""


@dataclass(frozen=True)
class AddressRequest:
    """One `[ADDR]` argument: a specific address, a subnet to allocate in, or the default subnet."""

    address: IPv4Interface | None = None
    subnet: IPv4Network | None = None  # None with address None → the default subnet

    @classmethod
    def parse(cls, text: str) -> AddressRequest:
        text = text.strip()
        try:
            if text == "net:default":
                return cls()
            if text.startswith("net:"):
                return cls(subnet=IPv4Network(text[4:], strict=True))
            if text.startswith("ip:"):
                text = text[3:]
            if "/" not in text:
                raise ValueError("an address needs a prefix length, e.g. 10.32.1.5/12")
            return cls(address=IPv4Interface(text))
        except ValueError as exc:
            raise AttachError(f"invalid address {text!r}: {exc}") from None

    def __str__(self) -> str:
        if self.address is not None:
            return str(self.address)
        return f"net:{self.subnet}" if self.subnet is not None else "net:default"


class Containers:
    """Attachments on this host, backed by IPAM and remembered in the store."""

    def __init__(self, *, store: Any, ipam: Allocator | None, mtu: int, docker: DockerClient | None = None) -> None:
        self.store = store
        self.ipam = ipam
        self.mtu = mtu
        self.docker = docker or DockerClient()

    # --- targets ---

    async def resolve(self, target: str) -> Namespace:
        container: tuple[str, int] | None = None
        if not target.startswith("/") and not _netns_name_exists(target):
            try:
                info = await self.docker.inspect_container(target)
            except DockerError:
                info = None  # no Docker here: only namespaces can be targets
            if info is not None:
                container = (str(info["Id"]), int(info.get("State", {}).get("Pid") or 0))
        try:
            return resolve(target, (lambda _name: container) if container else None)
        except TargetError as exc:
            raise AttachError(str(exc)) from None

    # --- attach / detach ---

    async def attach(
        self, target: str, requests: list[AddressRequest], *, multicast_route: bool = True
    ) -> list[IPv4Interface]:
        ns = await self.resolve(target)
        requests = requests or [AddressRequest()]
        got: list[IPv4Interface] = []
        fresh: list[IPv4Interface] = []  # allocated by this call: freed again if it fails
        held_before = set(self.ipam.lookup(ns.ident)) if self.ipam is not None else set()
        try:
            for request in requests:
                if request.address is not None:
                    if self.ipam is not None and request.address.ip in self.ipam.range:
                        await self.ipam.claim(ns.ident, request.address, is_container=True)
                    got.append(request.address)
                else:
                    if self.ipam is None:
                        raise AttachError(f"{request} needs IPAM, which is disabled (--ipalloc-range is empty)")
                    address = await self.ipam.allocate(ns.ident, request.subnet, is_container=True)
                    if address not in held_before:
                        fresh.append(address)
                    got.append(address)
            await trio.to_thread.run_sync(self._plumb, ns, got, multicast_route)
        except BaseException:
            if self.ipam is not None:
                with trio.CancelScope(shield=True):
                    for address in fresh:
                        await self.ipam.free(ns.ident, address.ip)
            raise
        self._remember(ns)
        return got

    def _plumb(self, ns: Namespace, cidrs: list[IPv4Interface], multicast_route: bool) -> None:
        try:
            bridge.ensure_bridge(mtu=self.mtu)
            firewall.allow_bridge_forwarding(bridge.BRIDGE_NAME)
            plumbing.attach(ns, cidrs, mtu=self.mtu, multicast_route=multicast_route)
        except (bridge.PlumbingError, firewall.FirewallError, OSError) as exc:
            raise AttachError(str(exc)) from None

    async def detach(self, target: str, requests: list[AddressRequest]) -> list[IPv4Interface]:
        ns = await self.resolve(target)
        wanted: list[IPv4Interface] | None = None
        if requests:
            wanted = []
            for request in requests:
                if request.address is None:
                    raise AttachError(f"detach takes addresses, not {request}")
                wanted.append(request.address)
        removed = await trio.to_thread.run_sync(plumbing.detach, ns, wanted)
        if self.ipam is not None:
            for cidr in removed:
                if cidr.ip in self.ipam.range:
                    await self.ipam.free(ns.ident, cidr.ip)
        if wanted is None or not await trio.to_thread.run_sync(plumbing.inspect, ns):
            self._forget(ns.ident)
        return removed

    # --- expose / hide ---

    async def expose(self, requests: list[AddressRequest], *, masquerade: bool = True) -> list[IPv4Interface]:
        got: list[IPv4Interface] = []
        for request in requests or [AddressRequest()]:
            if request.address is not None:
                address = request.address
                if self.ipam is not None and address.ip in self.ipam.range:
                    await self.ipam.claim(EXPOSE_IDENT, address)
            elif self.ipam is None:
                raise AttachError("expose without an address needs IPAM, which is disabled")
            else:
                address = await self.ipam.allocate(EXPOSE_IDENT, request.subnet)
            await trio.to_thread.run_sync(self._expose_plumbing, address, masquerade)
            got.append(address)
        return got

    def _expose_plumbing(self, address: IPv4Interface, masquerade: bool) -> None:
        from pyroute2 import IPRoute

        try:
            index = bridge.ensure_bridge(mtu=self.mtu)
            with IPRoute() as ipr:
                present = {
                    IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                    for a in ipr.get_addr(index=index, family=2)
                }
                if address not in present:
                    ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
            firewall.expose(bridge.BRIDGE_NAME, address.network, masquerade=masquerade)
        except (bridge.PlumbingError, firewall.FirewallError, OSError) as exc:
            raise AttachError(str(exc)) from None

    async def hide(self, requests: list[AddressRequest]) -> list[IPv4Interface]:
        from pyroute2 import IPRoute

        def unplumb() -> list[IPv4Interface]:
            removed: list[IPv4Interface] = []
            with IPRoute() as ipr:
                index = bridge.link_index(ipr, bridge.BRIDGE_NAME)
                if index is None:
                    return []
                for a in ipr.get_addr(index=index, family=2):
                    cidr = IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                    if not requests or any(r.address == cidr for r in requests):
                        ipr.addr("del", index=index, address=str(cidr.ip), prefixlen=cidr.network.prefixlen)
                        removed.append(cidr)
            for cidr in removed:
                firewall.hide(bridge.BRIDGE_NAME, cidr.network)
            return removed

        removed = await trio.to_thread.run_sync(unplumb)
        if self.ipam is not None:
            for cidr in removed:
                if cidr.ip in self.ipam.range:
                    await self.ipam.free(EXPOSE_IDENT, cidr.ip)
        return removed

    # --- ps ---

    async def ps(self) -> list[dict[str, Any]]:
        """What is attached now: one row per namespace (ident, MAC, addresses); the bridge first."""
        rows: list[dict[str, Any]] = []
        bridge_row = await trio.to_thread.run_sync(_bridge_row)
        if bridge_row is not None:
            rows.append(bridge_row)
        for ident, path in sorted(self._remembered().items()):
            seen = await trio.to_thread.run_sync(plumbing.inspect, Namespace(path=path, ident=ident))
            if seen is not None:
                rows.append({"ID": ident, "MAC": seen.mac, "CIDRs": [str(c) for c in seen.cidrs]})
        return rows

    def _remembered(self) -> dict[str, str]:
        value = self.store.get_json(_STORE_KEY, {})
        return value if isinstance(value, dict) else {}

    def _remember(self, ns: Namespace) -> None:
        known = self._remembered()
        known[ns.ident] = ns.path
        self.store.put_json(_STORE_KEY, known)

    def _forget(self, ident: str) -> None:
        known = self._remembered()
        if known.pop(ident, None) is not None:
            self.store.put_json(_STORE_KEY, known)

    def live_addresses(self) -> dict[str, list[IPv4Interface]]:
        """Addresses still configured in remembered namespaces (for IPAM's reclaim at start)."""
        found: dict[str, list[IPv4Interface]] = {}
        for ident, path in self._remembered().items():
            seen = plumbing.inspect(Namespace(path=path, ident=ident))
            if seen is not None:
                found[ident] = list(seen.cidrs)
        return found


def _netns_name_exists(name: str) -> bool:
    from weavenet.net.netns import NETNS_RUN_DIR

    return "/" not in name and (NETNS_RUN_DIR / name).exists()


def _bridge_row() -> dict[str, Any] | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = bridge.link_index(ipr, bridge.BRIDGE_NAME)
        if index is None:
            return None
        mac = str(ipr.get_links(index)[0].get("IFLA_ADDRESS"))
        cidrs = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=index, family=2)]
    return {"ID": EXPOSE_IDENT, "MAC": mac, "CIDRs": cidrs}


def ps_line(row: dict[str, Any]) -> str:
    """One `weavenet ps` line: a container id shortened to 12 characters as Docker shows it;
    other identities (weave:expose, netns:NAME) in full, since a prefix of them names nothing."""
    ident = str(row["ID"])
    shown = ident[:12] if ":" not in ident else ident
    return f"{shown} {row['MAC']} {' '.join(row['CIDRs'])}".rstrip()
