"""Freeing addresses whose container ended while nobody told us (Weave Net's PruneOwned, and more).

Two kinds of IPAM holdings can outlive their container when the router was down as it ended:
  * addresses held under a Docker container id (`weavenet attach <container>`, `POST /ip/<id>` with
    check-alive): freed once Docker no longer knows the container, in any state;
  * addresses the weavemesh IPAM driver handed to Docker: Docker releases them itself, but a
    ReleaseAddress sent while the router was down is lost. The address book (plugin.state) says
    which addresses Docker got from us; one that Docker has not mentioned since this start and that
    no container, gateway or auxiliary address of Docker's holds is freed.
This must never free an address in use, so it frees nothing unless Docker answered every listing;
only idents that are container ids (64 hex digits) allocated as containers (CNI's are not); only
book addresses still filed under their own text; none inside a swarm-scope network (service VIPs
hold addresses no container lists); and the plugin waits `SETTLE` seconds after it starts serving
before the second kind, so that a `docker run` cut in half by the restart (Docker retries a plugin
call for 15 s) has plugged its address in, or told us, first.
"""

from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address, IPv4Interface

from weavenet.plugin.docker_network import DockerInventory
from weavenet.plugin.ipam_driver import ANONYMOUS, Allocator
from weavenet.plugin.state import AddressBook

log = logging.getLogger(__name__)

CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
SETTLE = 20.0  # seconds after the sockets serve: Docker's plugin-call retries (15 s) are over by then


def gone_containers(holdings: dict[str, list[IPv4Interface]], known: frozenset[str]) -> dict[str, list[IPv4Interface]]:
    """The container-id idents (of `holdings`, the allocator's container idents) Docker does not know."""
    return {ident: cidrs for ident, cidrs in holdings.items() if CONTAINER_ID.fullmatch(ident) and ident not in known}


def lost_releases(
    leftovers: set[str], owned: dict[str, list[IPv4Interface]], docker: DockerInventory
) -> list[IPv4Address]:
    """The book's leftovers that IPAM still files under their own text and Docker does not use."""
    found = []
    for text in sorted(leftovers):
        try:
            address = IPv4Address(text)
        except ValueError:
            continue
        if docker.in_use(address):
            continue
        if any(cidr.ip == address for cidr in owned.get(text, [])):
            found.append(address)
    return found


async def prune_gone_containers(allocator: Allocator, docker: DockerInventory) -> dict[str, list[IPv4Interface]]:
    """Free what containers Docker no longer knows held; returns what was freed, by container id."""
    freed: dict[str, list[IPv4Interface]] = {}
    for ident in gone_containers(allocator.owned_by_containers(), docker.container_ids):
        released = await allocator.free(ident)
        if released:
            freed[ident] = released
            log.info(
                "plugin: freed %s of container %s: Docker no longer knows it",
                ", ".join(map(str, released)),
                ident[:12],
            )
    return freed


async def prune_lost_releases(allocator: Allocator, book: AddressBook, docker: DockerInventory) -> list[IPv4Interface]:
    """Free the addresses Docker got from us whose release never arrived; returns what was freed."""
    owned = allocator.owned()
    freed: list[IPv4Interface] = []
    for address in lost_releases(book.leftovers(), owned, docker):
        released = await allocator.free(ANONYMOUS, address)
        book.discard(str(address))
        freed += released
        if released:
            log.info("plugin: freed %s: Docker no longer uses it (its release was lost)", address)
    for text in book.leftovers():
        if text not in owned:  # IPAM let go of it otherwise (reset, rmpeer): nothing left to free
            book.discard(text)
    return freed
