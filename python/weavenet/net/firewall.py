"""Firewall rules that keep the overlay working next to Docker: forwarding and masquerade.

Docker may set the FORWARD policy to DROP, and with br_netfilter bridged frames pass through
FORWARD too, so traffic between containers on `weave` needs an explicit accept. `expose` needs
masquerading between the host and the overlay. The kernel fast path's VXLAN port must answer
nobody but current peers (WEAVENET-KERNEL: their addresses accepted, everything else dropped and
counted). All our rules live in our own chains (WEAVENET-FORWARD, WEAVENET-NAT, WEAVENET-KERNEL)
with a single jump from the built-in chain, so removing them is one flush. Rules go through the
`iptables` command in the same backend Docker uses (nft on modern Debian); every change is
idempotent (checked with -C before -A/-I).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

FORWARD_CHAIN = "WEAVENET-FORWARD"
NAT_CHAIN = "WEAVENET-NAT"
KERNEL_CHAIN = "WEAVENET-KERNEL"


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


def guard_kernel_port(port: int) -> None:
    """Drop every datagram to the kernel path's UDP port until peers are allowed (before it opens)."""
    _ensure_chain("filter", KERNEL_CHAIN)
    _ensure_rule("filter", KERNEL_CHAIN, ["-j", "DROP"])
    for stale in _jumps("filter", "INPUT", KERNEL_CHAIN):
        if stale != _kernel_jump(port):
            _iptables("-t", "filter", "-D", "INPUT", *stale)
    _ensure_rule("filter", "INPUT", _kernel_jump(port), first=True)


def _kernel_jump(port: int) -> list[str]:
    return ["-p", "udp", "-m", "udp", "--dport", str(port), "-j", KERNEL_CHAIN]


def _jumps(table: str, parent: str, chain: str) -> list[list[str]]:
    """The rules of `parent` that jump to `chain`, as -D arguments."""
    rules = _iptables("-t", table, "-S", parent, check=False).stdout.splitlines()
    return [line.split()[2:] for line in rules if line.startswith(f"-A {parent} ") and line.endswith(f"-j {chain}")]


def allow_kernel_peers(addresses: set[str]) -> None:
    """Accept the kernel port's datagrams from exactly these addresses (new ones first, so a
    change never opens the port to anyone else, even for a moment)."""
    current = set()
    for line in _iptables("-t", "filter", "-S", KERNEL_CHAIN).stdout.splitlines():
        words = line.split()
        if len(words) == 6 and words[2] == "-s" and words[4:] == ["-j", "ACCEPT"]:
            current.add(words[3].removesuffix("/32"))
    for address in sorted(addresses - current):
        _iptables("-t", "filter", "-I", KERNEL_CHAIN, "1", "-s", f"{address}/32", "-j", "ACCEPT")
    for address in sorted(current - addresses):
        _iptables("-t", "filter", "-D", KERNEL_CHAIN, "-s", f"{address}/32", "-j", "ACCEPT")


def kernel_dropped() -> int:
    """Datagrams to the kernel port from hosts that are not current peers, dropped so far."""
    result = _iptables("-t", "filter", "-L", KERNEL_CHAIN, "-n", "-v", "-x", check=False)
    for line in result.stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and words[2] == "DROP" and words[0].isdigit():
            return int(words[0])
    return 0


def close_kernel_port() -> None:
    _remove_chain("filter", "INPUT", KERNEL_CHAIN)


def _remove_chain(table: str, parent: str, chain: str) -> None:
    for jump in _jumps(table, parent, chain):
        _iptables("-t", table, "-D", parent, *jump, check=False)
    if _iptables("-t", table, "-n", "-L", chain, check=False).returncode == 0:
        _iptables("-t", table, "-F", chain)
        _iptables("-t", table, "-X", chain)


def remove_all() -> None:
    """Remove every rule and chain of ours (reset, plugin removal)."""
    for table, parent, chain in (
        ("filter", "FORWARD", FORWARD_CHAIN),
        ("nat", "POSTROUTING", NAT_CHAIN),
        ("filter", "INPUT", KERNEL_CHAIN),
    ):
        _remove_chain(table, parent, chain)
