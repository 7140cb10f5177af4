"""Docker's NetworkDriver protocol for the `weavemesh` (local) and `weave` (global) drivers.

Every network shares the one weave bridge (Weave Net's model: distinct subnets, no isolation).
CreateNetwork only records the network (its multicast option); CreateEndpoint makes the veth pair;
Join hands Docker the container end with the `ethwe` prefix and, for a multicast network, the
224.0.0.0/4 route. No gateway is returned, so Docker also plugs containers into docker_gwbridge for
external traffic, as with Weave Net. Handlers answer in milliseconds: netlink work runs in a
thread, and the one Docker API lookup (a network this host has not seen) has a sub-second deadline.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Interface
from typing import Any, Literal

import trio

from weavenet.net.bridge import BRIDGE_NAME, PlumbingError
from weavenet.plugin import endpoints
from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.options import (
    BadRequest,
    DriverError,
    bool_field,
    list_field,
    multicast_from_docker_options,
    multicast_from_options,
    object_field,
    string_field,
)
from weavenet.plugin.state import AddressBook, NetworkRecord, NetworkTable

log = logging.getLogger(__name__)

_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
DOCKER_LOOKUP_TIMEOUT = 0.8  # Docker waits on us while we ask it: stay well under a second
DISCOVERY_NODE = 1  # DiscoveryType for node discovery (the only kind remote drivers receive)

Scope = Literal["local", "global"]
Body = dict[str, Any]
Handler = Callable[[Body], Awaitable[Body]]
PeerCallback = Callable[[str], Awaitable[None]]


class NetworkDriver:
    """One NetworkDriver (one Docker driver name); `handlers()` maps method names to coroutines."""

    def __init__(
        self,
        name: str,
        scope: Scope,
        networks: NetworkTable,
        *,
        docker: DockerClient | None,
        bridge: str = BRIDGE_NAME,
        on_peer: PeerCallback | None = None,
        on_network: Callable[[], None] | None = None,
        book: AddressBook | None = None,
    ) -> None:
        self.name = name
        self.scope = scope
        self.networks = networks
        self.docker = docker
        self.bridge = bridge
        self.on_peer = on_peer
        self.on_network = on_network
        self.book = book  # told which addresses Docker plugs in, so none of them is pruned
        self.discovered: set[str] = set()

    def handlers(self) -> dict[str, Handler]:
        return {
            "GetCapabilities": self.get_capabilities,
            "CreateNetwork": self.create_network,
            "AllocateNetwork": self.allocate_network,
            "FreeNetwork": self.free_network,
            "DeleteNetwork": self.delete_network,
            "CreateEndpoint": self.create_endpoint,
            "EndpointOperInfo": self.endpoint_oper_info,
            "DeleteEndpoint": self.delete_endpoint,
            "Join": self.join,
            "Leave": self.leave,
            "DiscoverNew": self.discover_new,
            "DiscoverDelete": self.discover_delete,
            "ProgramExternalConnectivity": self.program_external_connectivity,
            "RevokeExternalConnectivity": self.revoke_external_connectivity,
            "GwAllocCheck": self.gw_alloc_check,
        }

    # --- networks ---

    async def get_capabilities(self, body: Body) -> Body:
        return {"Scope": self.scope, "ConnectivityScope": self.scope}

    async def create_network(self, body: Body) -> Body:
        network_id = string_field(body, "NetworkID", required=True)
        multicast = multicast_from_options(object_field(body, "Options"))
        pools = []
        for data in list_field(body, "IPv4Data"):
            if not isinstance(data, dict):
                raise BadRequest("field IPv4Data: expected an array of objects")
            pool = string_field(data, "Pool")
            if pool:
                pools.append(pool)
        self.networks.put(NetworkRecord(network_id, self.name, multicast, tuple(pools)))
        if self.on_network is not None:
            self.on_network()
        log.info(
            "network %s created (driver %s, %s, multicast %s)",
            network_id[:12],
            self.name,
            ", ".join(pools) or "no IPv4 pool",
            "on" if multicast else "off",
        )
        return {}

    async def allocate_network(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        options = object_field(body, "Options") or {}
        multicast_from_options(options)  # an invalid value fails here, on the manager, as in Weave Net
        return {"Options": options}

    async def free_network(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        return {}

    async def delete_network(self, body: Body) -> Body:
        network_id = string_field(body, "NetworkID", required=True)
        if self.networks.remove(network_id):
            log.info("network %s deleted", network_id[:12])
            if self.on_network is not None:
                self.on_network()
        return {}

    async def _network(self, network_id: str) -> NetworkRecord:
        """The network's record: ours, or learned from Docker (a global network made on another host)."""
        record = self.networks.get(network_id)
        if record is not None:
            return record
        if self.docker is None:
            raise DriverError(f"unable to find network info for {network_id[:12]}: no Docker API configured")
        found: dict[str, Any] | None = None
        with trio.move_on_after(DOCKER_LOOKUP_TIMEOUT) as lookup:
            try:
                found = await self.docker.inspect_network(network_id)
            except DockerError as exc:
                raise DriverError(f"unable to find network info for {network_id[:12]}: {exc}") from None
        if lookup.cancelled_caught:
            raise DriverError(f"unable to find network info for {network_id[:12]}: Docker did not answer in time")
        if found is None:
            raise DriverError(f"unknown network {network_id[:12]}")
        driver = str(found.get("Driver") or "")
        pools = tuple(str(c.get("Subnet")) for c in (found.get("IPAM") or {}).get("Config") or [] if c.get("Subnet"))
        record = NetworkRecord(
            network_id,
            driver or self.name,
            multicast_from_docker_options(found.get("Options")),
            pools,
            created=False,
        )
        self.networks.put(record)
        log.info("network %s learned from Docker (%s)", network_id[:12], found.get("Name"))
        return record

    # --- endpoints ---

    async def create_endpoint(self, body: Body) -> Body:
        network_id = string_field(body, "NetworkID", required=True)
        endpoint_id = string_field(body, "EndpointID", required=True)
        interface = object_field(body, "Interface")
        if interface is None:
            raise DriverError("Not supported: creating an interface from within CreateEndpoint")
        requested_mac = string_field(interface, "MacAddress")
        if requested_mac and not _MAC.fullmatch(requested_mac):
            raise DriverError(
                f"invalid MacAddress {requested_mac!r}: expected six hex octets such as 02:42:0a:20:00:09"
            )
        if self.book is not None and (address := _interface_address(string_field(interface, "Address"))):
            self.book.mention(address)  # in use by Docker, whatever becomes of this call
        await self._network(network_id)
        try:
            mac = await trio.to_thread.run_sync(
                lambda: endpoints.create_endpoint(endpoint_id, mac=requested_mac or None, bridge=self.bridge)
            )
        except PlumbingError as exc:
            raise DriverError(str(exc)) from None
        log.debug("endpoint %s on %s: %s", endpoint_id[:12], network_id[:12], endpoints.host_ifname(endpoint_id))
        # Docker refuses a MAC it did not ask for when the user set one (--mac-address): then we
        # have put the requested MAC on the veth and say nothing.
        return {"Interface": {} if requested_mac else {"MacAddress": mac}}

    async def endpoint_oper_info(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        string_field(body, "EndpointID", required=True)
        return {"Value": {}}

    async def delete_endpoint(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        endpoint_id = string_field(body, "EndpointID", required=True)
        try:
            removed = await trio.to_thread.run_sync(endpoints.delete_endpoint, endpoint_id)
        except PlumbingError as exc:
            log.warning("DeleteEndpoint %s: %s", endpoint_id[:12], exc)
            return {}
        if not removed:
            log.debug("DeleteEndpoint %s: its veth was already gone", endpoint_id[:12])
        return {}

    async def join(self, body: Body) -> Body:
        network_id = string_field(body, "NetworkID", required=True)
        endpoint_id = string_field(body, "EndpointID", required=True)
        sandbox_key = string_field(body, "SandboxKey")
        object_field(body, "Options")
        record = await self._network(network_id)
        if not await trio.to_thread.run_sync(endpoints.endpoint_ready, endpoint_id):
            raise DriverError(
                f"unknown endpoint {endpoint_id[:12]}: interface {endpoints.guest_ifname(endpoint_id)} not found"
            )
        reply: Body = {
            "InterfaceName": {"SrcName": endpoints.guest_ifname(endpoint_id), "DstPrefix": endpoints.CONTAINER_PREFIX}
        }
        if record.multicast:
            if await trio.to_thread.run_sync(endpoints.sandbox_has_route, sandbox_key):
                raise DriverError(
                    f"container already has the multicast route {endpoints.MULTICAST_ROUTE} from another network; "
                    "only one network per container may have works.weave.multicast on"
                )
            reply["StaticRoutes"] = [{"Destination": str(endpoints.MULTICAST_ROUTE), "RouteType": 1}]
        return reply

    async def leave(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        string_field(body, "EndpointID", required=True)
        return {}

    # --- the rest of the protocol ---

    async def discover_new(self, body: Body) -> Body:
        address = self._discovered_node(body)
        if address is not None and address not in self.discovered:
            self.discovered.add(address)
            log.info("Docker discovered node %s", address)
            if self.on_peer is not None:
                await self.on_peer(address)
        return {}

    async def discover_delete(self, body: Body) -> Body:
        address = self._discovered_node(body)
        if address is not None and address in self.discovered:
            self.discovered.discard(address)
            log.info("Docker lost node %s (mesh connections are left to the router)", address)
        return {}

    def _discovered_node(self, body: Body) -> str | None:
        """The address of another node from a node-discovery notice; None for ourselves or other kinds."""
        kind = body.get("DiscoveryType")
        if not isinstance(kind, int) or isinstance(kind, bool):
            raise BadRequest("field DiscoveryType: expected a number")
        data = object_field(body, "DiscoveryData") or {}
        if kind != DISCOVERY_NODE:
            return None
        address = string_field(data, "Address")
        if bool_field(data, "Self") or not address:
            return None
        return address

    async def program_external_connectivity(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        string_field(body, "EndpointID", required=True)
        return {}

    async def revoke_external_connectivity(self, body: Body) -> Body:
        string_field(body, "NetworkID", required=True)
        string_field(body, "EndpointID", required=True)
        return {}

    async def gw_alloc_check(self, body: Body) -> Body:
        # Docker 28 asks only if GetCapabilities says GwAllocChecker (we do not): reserve as usual.
        object_field(body, "Options")
        return {"SkipIPv4": False, "SkipIPv6": False}


def _interface_address(text: str) -> str | None:
    """The IPv4 address of CreateEndpoint's `Interface.Address` ("10.32.0.2/12"), or None."""
    try:
        return str(IPv4Interface(text).ip) if text else None
    except ValueError:
        return None
