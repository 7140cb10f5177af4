"""What the plugin asks Docker: create the `weave` network, list our networks and their containers,
and take stock of every address Docker uses (for the prune at start).

The `weave` network is created with an explicit subnet (without one, Docker discards a pool that
overlaps a host route and asks again forever: Weave Net's `weave launch` hang) and multicast on.
"Already exists" is fine when it is ours; a same-named network of another driver is reported, never
replaced. Docker calls back into our sockets while it creates the network, so the sockets must be
serving first. Every call has a deadline (the DockerClient's).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_network
from typing import Any

from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.options import MULTICAST_OPTION

log = logging.getLogger(__name__)


class NetworkConflict(Exception):
    """A Docker network with our name exists but is not ours."""


@dataclass(frozen=True)
class DockerNetwork:
    network_id: str
    name: str
    driver: str


@dataclass(frozen=True)
class DockerEndpoint:
    """A container's endpoint on one of our networks, as Docker reports it."""

    container_id: str
    network_id: str
    endpoint_id: str
    mac: str
    address: IPv4Interface | None


def weave_network_spec(name: str, driver: str, subnet: IPv4Network) -> dict[str, Any]:
    return {
        "Name": name,
        "Driver": driver,
        "CheckDuplicate": True,
        "IPAM": {"Driver": driver, "Config": [{"Subnet": str(subnet)}]},
        "Options": {MULTICAST_OPTION: "true"},
    }


async def ensure_network(docker: DockerClient, name: str, driver: str, subnet: IPv4Network) -> str:
    """Create the network unless it exists; "created" or "exists". Raises DockerError or NetworkConflict."""
    try:
        await docker.create_network(weave_network_spec(name, driver, subnet))
        return "created"
    except DockerError as create_error:
        if create_error.status == 0:
            raise
        existing = await docker.inspect_network(name)
        if existing is None:
            raise
    if existing.get("Name") != name:
        raise NetworkConflict(f"Docker resolved {name!r} to another network ({existing.get('Name')})")
    if existing.get("Driver") != driver:
        raise NetworkConflict(
            f"a Docker network named {name!r} already exists with driver {existing.get('Driver')!r}; "
            f"remove it (docker network rm {name}) or give --plugin-network another name"
        )
    return "exists"


async def our_networks(docker: DockerClient, drivers: list[str]) -> list[DockerNetwork]:
    found: list[DockerNetwork] = []
    for driver in drivers:
        listed = await docker.call("GET", "/networks", query={"filters": json.dumps({"driver": [driver]})})
        for net in listed or []:
            # the driver filter matches exactly on 20.10, but be strict anyway
            if net.get("Driver") == driver:
                found.append(DockerNetwork(str(net["Id"]), str(net.get("Name", "")), driver))
    return found


async def endpoints_on(docker: DockerClient, network_ids: set[str]) -> list[DockerEndpoint]:
    """Endpoints of running containers on the given networks (one Docker call)."""
    if not network_ids:
        return []
    found: list[DockerEndpoint] = []
    for container in await docker.list_containers() or []:
        networks = ((container.get("NetworkSettings") or {}).get("Networks")) or {}
        for settings in networks.values():
            if settings.get("NetworkID") not in network_ids:
                continue
            address = None
            if settings.get("IPAddress"):
                try:
                    address = IPv4Interface(f"{settings['IPAddress']}/{settings.get('IPPrefixLen') or 32}")
                except ValueError:
                    address = None
            found.append(
                DockerEndpoint(
                    container_id=str(container["Id"]),
                    network_id=str(settings["NetworkID"]),
                    endpoint_id=str(settings.get("EndpointID") or ""),
                    mac=str(settings.get("MacAddress") or ""),
                    address=address,
                )
            )
    return found


@dataclass(frozen=True)
class DockerInventory:
    """What Docker holds, as far as addresses go: every container it knows (in any state), every
    IPv4 address a container endpoint, a network gateway or an auxiliary address uses, and the
    subnets of swarm-scope networks, whose service VIPs hold addresses no container lists."""

    container_ids: frozenset[str]
    addresses: frozenset[IPv4Address]
    swarm_subnets: tuple[IPv4Network, ...] = ()

    def in_use(self, address: IPv4Address) -> bool:
        return address in self.addresses or any(address in subnet for subnet in self.swarm_subnets)


ANYWHERE = IPv4Network("0.0.0.0/0")


async def inventory(docker: DockerClient) -> DockerInventory:
    """Take stock in two calls. Raises DockerError if Docker fails either, or answers in a shape
    we do not know: a partial picture would make a prune free what is in use."""
    containers = await docker.call("GET", "/containers/json", query={"all": "1"})
    networks = await docker.call("GET", "/networks")
    if not isinstance(containers, list) or not isinstance(networks, list):
        raise DockerError("Docker answered the container or network list in an unexpected shape")
    ids: set[str] = set()
    addresses: set[IPv4Address] = set()
    swarm_subnets: list[IPv4Network] = []
    try:
        for container in containers:
            ids.add(str(container["Id"]))
            for settings in (((container.get("NetworkSettings") or {}).get("Networks")) or {}).values():
                _add_address(addresses, settings.get("IPAddress"))
        for network in networks:
            configs = (network.get("IPAM") or {}).get("Config") or []
            for config in configs:
                _add_address(addresses, config.get("Gateway"))
                for aux in (config.get("AuxiliaryAddresses") or {}).values():
                    _add_address(addresses, aux)
            if network.get("Scope") == "swarm":
                subnets = [_subnet(config.get("Subnet")) for config in configs]
                # a swarm network whose subnet we cannot read could hold any address
                swarm_subnets += [s for s in subnets if s is not None] if any(subnets) else [ANYWHERE]
    except (KeyError, TypeError, AttributeError) as exc:
        raise DockerError(f"Docker answered the container or network list in an unexpected shape ({exc!r})") from None
    return DockerInventory(frozenset(ids), frozenset(addresses), tuple(swarm_subnets))


def _subnet(text: object) -> IPv4Network | None:
    if not isinstance(text, str):
        return None
    try:
        subnet = ip_network(text, strict=False)
    except ValueError:
        return None
    return subnet if isinstance(subnet, IPv4Network) else None


def _add_address(addresses: set[IPv4Address], text: object) -> None:
    if isinstance(text, str) and text:
        with contextlib.suppress(ValueError):  # IPv6 or garbage: not an address weavenet IPAM hands out
            addresses.add(IPv4Address(text.split("/", 1)[0]))
