"""Firewall rules that keep the overlay working next to Docker: forwarding and masquerade.

Docker may set the FORWARD policy to DROP, and with br_netfilter bridged frames pass through
FORWARD too, so traffic between containers on `weave` needs an explicit accept. `expose` needs
masquerading between the host and the overlay. All our rules live in our own chains
(WEAVENET-FORWARD, WEAVENET-NAT) with a single jump from the built-in chain, so removing them is
one flush. Rules go through the `iptables` command in the same backend Docker uses (nft on modern
Debian); every change is idempotent (checked with -C before -A/-I).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

FORWARD_CHAIN = "WEAVENET-FORWARD"
NAT_CHAIN = "WEAVENET-NAT"


class FirewallError(Exception):
    pass


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("iptables")
    if binary is None:
        raise FirewallError("iptables not found (Debian package iptables)")
    result = subprocess.run([binary, "-w", "5", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)}: {result.stderr.strip()}")
    return result


def _exists(table: str, chain: str, rule: list[str]) -> bool:
    return _iptables("-t", table, "-C", chain, *rule, check=False).returncode == 0


def _ensure_chain(table: str, chain: str) -> None:
    if _iptables("-t", table, "-n", "-L", chain, check=False).returncode != 0:
        _iptables("-t", table, "-N", chain)


def _ensure_rule(table: str, chain: str, rule: list[str], *, first: bool = False) -> None:
    if not _exists(table, chain, rule):
        if first:
            _iptables("-t", table, "-I", chain, "1", *rule)
        else:
            _iptables("-t", table, "-A", chain, *rule)


def allow_bridge_forwarding(bridge: str) -> None:
    """Accept traffic bridged between ports of `bridge`, whatever the FORWARD policy."""
    _ensure_chain("filter", FORWARD_CHAIN)
    _ensure_rule("filter", FORWARD_CHAIN, ["-i", bridge, "-o", bridge, "-j", "ACCEPT"])
    _ensure_rule("filter", "FORWARD", ["-j", FORWARD_CHAIN], first=True)


def expose(bridge: str, subnet: IPv4Network, *, masquerade: bool = True) -> None:
    """Let the host (and beyond) reach `subnet` on the bridge; masquerade traffic crossing over."""
    allow_bridge_forwarding(bridge)
    _ensure_rule("filter", FORWARD_CHAIN, ["-i", bridge, "!", "-o", bridge, "-j", "ACCEPT"])
    _ensure_rule(
        "filter",
        FORWARD_CHAIN,
        ["-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
    )
    if masquerade:
        _ensure_chain("nat", NAT_CHAIN)
        net = str(subnet)
        _ensure_rule("nat", NAT_CHAIN, ["-s", net, "!", "-d", net, "-j", "MASQUERADE"])
        _ensure_rule("nat", NAT_CHAIN, ["!", "-s", net, "-o", bridge, "-j", "MASQUERADE"])
        _ensure_rule("nat", "POSTROUTING", ["-j", NAT_CHAIN], first=True)


def hide(bridge: str, subnet: IPv4Network) -> None:
    net = str(subnet)
    for rule in (["-s", net, "!", "-d", net, "-j", "MASQUERADE"], ["!", "-s", net, "-o", bridge, "-j", "MASQUERADE"]):
        if _exists("nat", NAT_CHAIN, rule):
            _iptables("-t", "nat", "-D", NAT_CHAIN, *rule)


def remove_all() -> None:
    """Remove every rule and chain of ours (reset, plugin removal)."""
    for table, parent, chain in (("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN)):
        while _exists(table, parent, ["-j", chain]):
            _iptables("-t", table, "-D", parent, "-j", chain)
        if _iptables("-t", table, "-n", "-L", chain, check=False).returncode == 0:
            _iptables("-t", table, "-F", chain)
            _iptables("-t", table, "-X", chain)
