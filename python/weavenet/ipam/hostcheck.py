"""Start-up check: the allocation range must not overlap a route the host already has.

Handing out addresses the host already routes elsewhere breaks containers in ways that are hard
to see, so the router refuses to start and names the flag and the route (Weave Net's checkRange).
Routes through the `weave` bridge are ours and ignored, as are default routes. Read-only: it
lists routes through netlink in the caller's network namespace and never changes anything.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from weavenet.config import ConfigError

log = logging.getLogger("weavenet.ipam")

MAIN_TABLE = 254
BRIDGE_NAME = "weave"
EXPOSE_IDENT = "weave:expose"


def host_routes(ipr: IPRoute) -> list[tuple[IPv4Network, str]]:
    """(destination, device) for every prefix route in the main IPv4 table."""
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    found = []
    for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        dst_len = int(route["dst_len"])
        if dst_len == 0:
            continue  # default route: overlaps everything by definition
        dst = route.get_attr("RTA_DST")
        if dst is None:
            continue
        device = names.get(route.get_attr("RTA_OIF"), "?")
        found.append((IPv4Network(f"{dst}/{dst_len}", strict=False), str(device)))
    return found


def check_range_is_free(ipalloc_range: IPv4Network, *, bridge: str = BRIDGE_NAME) -> None:
    """Raise ConfigError("--ipalloc-range: ...") if a host route (not via `bridge`) overlaps it."""
    try:
        with IPRoute() as ipr:
            routes = host_routes(ipr)
    except (OSError, NetlinkError) as exc:
        log.warning("cannot read the host's routes to check --ipalloc-range against them: %s", exc)
        return
    for network, device in routes:
        if device != bridge and network.overlaps(ipalloc_range):
            raise ConfigError(
                "--ipalloc-range",
                f"{ipalloc_range} overlaps the host route {network} dev {device}; "
                "choose a range no host route uses (or remove that route)",
            )


def bridge_addresses(bridge: str = BRIDGE_NAME) -> list[tuple[str, IPv4Interface]]:
    """Addresses on the bridge (`weavenet expose` leaves them there): reclaimed at start as
    "weave:expose", so a router that lost its state does not hand them out again. Blocking."""
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                return []
            return [
                (EXPOSE_IDENT, IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}"))
                for addr in ipr.get_addr(index=found[0], family=socket.AF_INET)
            ]
    except NetlinkError as exc:
        raise OSError(f"cannot list the addresses of bridge {bridge}: {exc}") from None
