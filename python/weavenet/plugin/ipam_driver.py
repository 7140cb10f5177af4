"""Docker's IpamDriver protocol for `weavemesh`, backed by the router's partition-tolerant IPAM.

Pools are named as Weave Net named them, `weave-<subnet>-<range>`, and carry a fake gateway (the
subnet's network address) so Docker asks for no gateway address; its release is ignored. Addresses
come lowest-free-first from the allocator; a static `--ip` is a claim, refused if the address is in
use. Docker gives no container id, so addresses are filed under their own text (Weave Net's `_`
owner), which is also how a release finds them; the plugin's address book (plugin.state) records
which of them Docker holds, so one whose release was lost can be freed at the next start
(plugin.prune). Docker must never wait on us for more than a
second: an IPAM call that cannot be served in time (no quorum yet, unreachable peers) answers
`{"Err": ...}` naming the problem. A call cut short leaves nothing behind: the allocator records an
address only in the step that returns it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any, Protocol

import trio
from pyroute2 import IPRoute

from weavenet.ipam.errors import IpamError
from weavenet.plugin.options import (
    DriverError,
    bool_field,
    object_field,
    string_field,
)
from weavenet.plugin.state import AddressBook

log = logging.getLogger(__name__)

LOCAL_ADDRESS_SPACE = "weavelocal"
GLOBAL_ADDRESS_SPACE = "weaveglobal"
GATEWAY_OPTION = "com.docker.network.gateway"
IPAM_TIMEOUT = 0.8  # the allocator's own deadline; the guard below is the hard limit
IPAM_GUARD = 0.95
ANONYMOUS = "_"  # the allocator files the address under its own text (weavenet.ipam.allocator.ANONYMOUS)

Body = dict[str, Any]


class Allocator(Protocol):
    """The part of `weavenet.ipam.allocator.Allocator` the plugin uses (the driver and the prune)."""

    range: IPv4Network
    default_subnet: IPv4Network

    async def allocate(
        self,
        ident: str,
        subnet: IPv4Network | None = None,
        *,
        is_container: bool = False,
        timeout: float | None = 30.0,
    ) -> IPv4Interface: ...

    async def claim(
        self,
        ident: str,
        address: IPv4Interface,
        *,
        is_container: bool = False,
        no_error_on_unknown: bool = False,
        timeout: float | None = 30.0,
    ) -> None: ...

    async def free(self, ident: str, address: IPv4Address | None = None) -> list[IPv4Interface]: ...

    def owned(self) -> dict[str, list[IPv4Interface]]: ...

    def owned_by_containers(self) -> dict[str, list[IPv4Interface]]: ...


def pool_id(subnet: IPv4Network, iprange: IPv4Network) -> str:
    return f"weave-{subnet}-{iprange}"


def parse_pool_id(text: str) -> tuple[IPv4Network, IPv4Network]:
    parts = text.split("-")
    if len(parts) != 3 or parts[0] != "weave":
        raise DriverError(f"Unrecognized pool ID: {text}")
    try:
        subnet, iprange = IPv4Network(parts[1]), IPv4Network(parts[2])
    except ValueError:
        raise DriverError(f"Unrecognized pool ID: {text}") from None
    if not iprange.subnet_of(subnet):
        raise DriverError(f"Unrecognized pool ID: {text}")
    return subnet, iprange


def _network(text: str, what: str) -> IPv4Network:
    try:
        network = ip_network(text.strip(), strict=False)
    except ValueError:
        raise DriverError(f"invalid {what} {text!r}: expected a CIDR such as 10.32.0.0/12") from None
    if not isinstance(network, IPv4Network):
        raise DriverError(f"invalid {what} {text}: weavemesh IPAM serves IPv4 only")
    return network


def _address(text: str) -> IPv4Address:
    try:
        address = ip_address(text.split("/", 1)[0].strip())
    except ValueError:
        raise DriverError(f"invalid address {text!r}") from None
    if not isinstance(address, IPv4Address):
        raise DriverError(f"invalid address {text}: weavemesh IPAM serves IPv4 only")
    return address


def host_overlap(subnet: IPv4Network) -> str | None:
    """What on this host overlaps `subnet` the way Docker checks a dynamic pool: a route or a nameserver."""
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get("RTA_DST")
            if dst is None or route["dst_len"] == 0:
                continue
            routed = IPv4Network(f"{dst}/{route['dst_len']}", strict=False)
            if routed.overlaps(subnet):
                return f"the host route to {routed}"
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                server = ip_address(fields[1])
            except ValueError:
                continue
            if server in subnet:
                return f"the nameserver {server}"
    return None


class IpamDriver:
    """IpamDriver handlers; `allocator()` returns the router's allocator (None when IPAM is off)."""

    def __init__(self, allocator: Callable[[], Allocator | None], book: AddressBook | None = None) -> None:
        self._allocator = allocator
        self.book = book if book is not None else AddressBook()

    def handlers(self) -> dict[str, Callable[[Body], Any]]:
        return {
            "GetCapabilities": self.get_capabilities,
            "GetDefaultAddressSpaces": self.get_default_address_spaces,
            "RequestPool": self.request_pool,
            "ReleasePool": self.release_pool,
            "RequestAddress": self.request_address,
            "ReleaseAddress": self.release_address,
        }

    def ipam(self) -> Allocator:
        allocator = self._allocator()
        if allocator is None:
            raise DriverError(
                "weavenet IPAM is not running (is --ipalloc-range empty?); use --ipam-driver default instead"
            )
        return allocator

    async def get_capabilities(self, body: Body) -> Body:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    async def get_default_address_spaces(self, body: Body) -> Body:
        return {"LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE, "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE}

    async def request_pool(self, body: Body) -> Body:
        space = string_field(body, "AddressSpace")
        pool = string_field(body, "Pool")
        sub_pool = string_field(body, "SubPool")
        object_field(body, "Options")
        if bool_field(body, "V6"):
            raise DriverError("weavemesh IPAM serves IPv4 only; for IPv6 use another IPAM driver")
        ipam = self.ipam()
        if pool:
            subnet = _network(pool, "subnet")
        else:
            subnet = ipam.default_subnet
            if space != GLOBAL_ADDRESS_SPACE:
                # Docker discards a dynamic pool that overlaps a host route and asks again; as we
                # would answer the same, it would ask forever (Weave Net's `weave launch` hang).
                overlap = await trio.to_thread.run_sync(host_overlap, subnet)
                if overlap is not None:
                    raise DriverError(
                        f"default subnet {subnet} overlaps {overlap}; create the network with an explicit --subnet"
                    )
        iprange = _network(sub_pool, "ip-range") if sub_pool else subnet
        if not iprange.subnet_of(subnet):
            raise DriverError(f"ip-range {iprange} is not inside subnet {subnet}")
        if not iprange.subnet_of(ipam.range):
            raise DriverError(
                f"{'ip-range' if sub_pool else 'subnet'} {iprange} is outside weavenet's allocation range "
                f"{ipam.range} (--ipalloc-range)"
            )
        return {"PoolID": pool_id(subnet, iprange), "Pool": str(subnet), "Data": {GATEWAY_OPTION: str(subnet)}}

    async def release_pool(self, body: Body) -> Body:
        parse_pool_id(string_field(body, "PoolID", required=True))
        return {}

    async def request_address(self, body: Body) -> Body:
        subnet, iprange = parse_pool_id(string_field(body, "PoolID", required=True))
        wanted = string_field(body, "Address")
        object_field(body, "Options")
        ipam = self.ipam()
        if wanted:
            address = _address(wanted)
            if address not in subnet:
                raise DriverError(f"address {address} is not in subnet {subnet}")
            holder = next((ident for ident, held in ipam.owned().items() if any(c.ip == address for c in held)), None)
            if holder is not None:
                by = "" if holder == str(address) else f" (by {holder})"
                raise DriverError(f"address {address} is already in use{by}")
            cidr = IPv4Interface(f"{address}/{subnet.prefixlen}")
            await _guarded(f"claim {address}", lambda timeout: ipam.claim(ANONYMOUS, cidr, timeout=timeout))
        else:
            got = await _guarded(
                f"allocate in {iprange}", lambda timeout: ipam.allocate(ANONYMOUS, iprange, timeout=timeout)
            )
            cidr = IPv4Interface(f"{got.ip}/{subnet.prefixlen}")
        self.book.add(str(cidr.ip))
        log.debug("IPAM: %s to Docker", cidr)
        return {"Address": str(cidr), "Data": {}}

    async def release_address(self, body: Body) -> Body:
        subnet, _ = parse_pool_id(string_field(body, "PoolID", required=True))
        address = _address(string_field(body, "Address", required=True))
        if address == subnet.network_address:
            return {}  # the fake gateway RequestPool handed out
        try:
            released = await self.ipam().free(ANONYMOUS, address)
        except IpamError as exc:
            raise DriverError(f"weavenet IPAM: {exc}") from None
        self.book.discard(str(address))
        if not released:
            # Nothing filed under its own text: Docker did not get it from us (or an older router
            # reclaimed it under a container id). Weave Net answered 500; Docker only logs it.
            log.debug("IPAM: release of %s, which is not filed under its own text", address)
        return {}


async def _guarded(what: str, call: Callable[[float], Awaitable[Any]]) -> Any:
    """Run an allocator call under a hard deadline, turning every failure into a one-line DriverError.

    The first attempt does not wait (timeout 0: it is served at once if it can be, and it starts
    consensus when there is no ring yet); only then do we wait, so an allocator that notices a ring
    it has just made only at its next tick still answers the first `docker run` in time.
    """
    with trio.move_on_after(IPAM_GUARD):
        try:
            try:
                return await call(0.0)
            except IpamError as exc:
                if exc.kind != "unavailable":
                    raise
            return await call(IPAM_TIMEOUT)
        except IpamError as exc:
            raise DriverError(f"weavenet IPAM: {exc}") from None
    raise DriverError(f"weavenet IPAM could not {what} within {IPAM_GUARD:.1f}s; is the mesh ready?")
