"""Per-interface kernel settings through /proc/sys, in the caller's network namespace.

Used to switch IPv6 router advertisements and autoconfiguration off on our links, so an overlay
never picks up addresses or routes from a stray RA. Never raises for a knob the kernel lacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write(path: str, value: str) -> bool:
    """Write one sysctl; False (logged at debug) if the knob does not exist here."""
    try:
        Path("/proc/sys", path).write_text(value)
        return True
    except OSError as exc:
        log.debug("sysctl %s=%s not applied: %s", path, value, exc)
        return False


def read(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text().strip()
    except OSError:
        return None


def quiet_ipv6(ifname: str) -> None:
    """No router advertisements, no autoconfigured addresses on this interface."""
    write(f"net/ipv6/conf/{ifname}/accept_ra", "0")
    write(f"net/ipv6/conf/{ifname}/autoconf", "0")
