"""Choosing the overlay MTU from the underlay, so encapsulated frames never fragment.

The overlay MTU is the underlay interface's MTU (the one carrying the default route, or the
lowest of the routes we know) minus what encapsulation adds. `WEAVE_MTU`/`--mtu` overrides it.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from weavenet._fastdp import datapath_overlay_mtu

MIN_MTU = 576
FALLBACK_UNDERLAY_MTU = 1500


def underlay_mtu() -> int:
    """The MTU of the interface carrying the default route (or the largest non-loopback link)."""
    with IPRoute() as ipr:
        for route in ipr.get_default_routes():
            oif = route.get("RTA_OIF")
            if oif is not None:
                return int(ipr.get_links(oif)[0].get("IFLA_MTU"))
        mtus = [
            int(link.get("IFLA_MTU"))
            for link in ipr.get_links()
            if link.get("IFLA_IFNAME") != "lo" and link.get("IFLA_MTU")
        ]
    return max(mtus, default=FALLBACK_UNDERLAY_MTU)


def overlay_mtu(override: int | None = None, *, encrypted: bool, underlay: int | None = None) -> int:
    """The overlay MTU: the override, or what the underlay carries after the datapath's encapsulation
    (its own figure: outer headers, our header, and the AEAD tag when encrypted)."""
    if override is not None:
        return override
    return max(MIN_MTU, datapath_overlay_mtu(underlay if underlay is not None else underlay_mtu(), encrypted))
