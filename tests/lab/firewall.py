"""Link faults between lab hosts (cut, heal, isolate, rejoin, block a UDP port) as nftables drops in
the lab's switch.

The switch namespace gets one table, `bridge wnlab`, whose forward chain drops frames between two
switch ports (a cut), from and to one port (an isolated host), or UDP datagrams to one port between
two switch ports (a block: a firewall that stops one protocol and lets the rest through). Ports are
named after hosts. Why in the switch rather than inside the hosts:
- loss is silent, as in a real partition: a host's own output is never refused (drops in a host's
  OUTPUT chain make sendto() fail with EPERM, which no real network does), and nothing is rejected;
- it stops everything between the two hosts (TCP, UDP, ICMP, ARP, IPv6, any source address),
  while the underlay links stay up and both hosts still reach every other host;
- weavenet's own firewall changes inside a host (its nft/iptables rules) can never undo a cut.

The table is always rewritten whole from the desired state in one atomic nft transaction, so every
operation is idempotent and a table deleted by someone else comes back on the next change. This
module must never run nft outside the lab's switch namespace, and never touch any table but its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.lab.netns import Namespace, check_ifname

TABLE = "wnlab"  # `table bridge wnlab` in the switch namespace; the name is reserved for the lab
PRIORITY = -300  # before any other bridge filter


def render(
    cuts: Iterable[tuple[str, str]], isolated: Iterable[str], blocked: Iterable[tuple[str, str, int]] = ()
) -> str:
    """The nft script that replaces the switch's lab table with this state (pure; no side effects).

    `cuts` are pairs of switch ports (either order; both directions are dropped); `isolated` ports
    exchange nothing with any other port; `blocked` are (port, port, UDP port) triples: datagrams to
    that UDP port between the two switch ports are dropped, both ways.
    """
    pairs = sorted({pair for a, b in cuts for pair in ((a, b), (b, a))})
    ports = sorted(set(isolated))
    blocks = sorted({triple for a, b, udp in blocked for triple in ((a, b, udp), (b, a, udp))})
    for port in [*ports, *(port for pair in pairs for port in pair), *(p for a, b, _ in blocks for p in (a, b))]:
        check_ifname(port)
    for _, _, udp in blocks:
        if not 0 < udp < 65536:
            raise ValueError(f"UDP port {udp} out of range")
    cut_elements = ", ".join(f'"{a}" . "{b}"' for a, b in pairs)
    isolated_elements = ", ".join(f'"{port}"' for port in ports)
    block_elements = ", ".join(f'"{a}" . "{b}" . {udp}' for a, b, udp in blocks)
    return (
        # "add" first so that "delete" cannot fail: together they replace the table atomically.
        f"add table bridge {TABLE}\n"
        f"delete table bridge {TABLE}\n"
        f"table bridge {TABLE} {{\n"
        f"    set cut_pairs {{\n"
        f"        type ifname . ifname\n" + (f"        elements = {{ {cut_elements} }}\n" if pairs else "") + "    }\n"
        "    set isolated {\n"
        "        type ifname\n" + (f"        elements = {{ {isolated_elements} }}\n" if ports else "") + "    }\n"
        "    set blocked_udp {\n"
        "        type ifname . ifname . inet_service\n"
        + (f"        elements = {{ {block_elements} }}\n" if blocks else "")
        + "    }\n"
        "    chain forward {\n"
        f"        type filter hook forward priority {PRIORITY}; policy accept;\n"
        "        iifname @isolated counter drop\n"
        "        oifname @isolated counter drop\n"
        "        iifname . oifname @cut_pairs counter drop\n"
        "        iifname . oifname . udp dport @blocked_udp counter drop\n"
        "    }\n"
        "}\n"
    )


class SwitchFirewall:
    """The fault state of a lab's switch: which port pairs are cut, which ports are isolated."""

    def __init__(self, switch: Namespace) -> None:
        self.switch = switch
        self.cuts: set[frozenset[str]] = set()
        self.isolated: set[str] = set()
        self.blocked: set[tuple[frozenset[str], int]] = set()

    def apply(self) -> None:
        """Write the current state into the switch's table (one atomic nft transaction)."""
        blocked = [(min(pair), max(pair), udp) for pair, udp in self.blocked]
        script = render([(min(pair), max(pair)) for pair in self.cuts], self.isolated, blocked)
        self.switch.run(["nft", "-f", "-"], input=script, timeout=30.0)

    def cut(self, a: str, b: str) -> None:
        """Drop every frame between ports `a` and `b`, both ways."""
        if a == b:
            raise ValueError(f"cannot cut {a} from itself")
        self.cuts.add(frozenset((a, b)))
        self.apply()

    def heal(self, a: str, b: str) -> None:
        """Undo cut(a, b) (no-op if they were not cut)."""
        self.cuts.discard(frozenset((a, b)))
        self.apply()

    def isolate(self, port: str) -> None:
        """Drop every frame from and to `port`."""
        self.isolated.add(port)
        self.apply()

    def rejoin(self, port: str) -> None:
        """Undo isolate(port); cuts stay as they were."""
        self.isolated.discard(port)
        self.apply()

    def block_udp(self, a: str, b: str, udp_port: int) -> None:
        """Drop UDP datagrams to `udp_port` between ports `a` and `b`, both ways; the rest passes."""
        if a == b:
            raise ValueError(f"cannot block {a} from itself")
        self.blocked.add((frozenset((a, b)), udp_port))
        self.apply()

    def unblock_udp(self, a: str, b: str, udp_port: int) -> None:
        self.blocked.discard((frozenset((a, b)), udp_port))
        self.apply()

    def heal_all(self) -> None:
        """Undo every cut, isolation and block."""
        self.cuts.clear()
        self.isolated.clear()
        self.blocked.clear()
        self.apply()

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.cuts

    def cut_from(self, port: str) -> list[str]:
        """The ports `port` is cut from (not counting isolation)."""
        return sorted(other for pair in self.cuts if port in pair for other in pair if other != port)

    def ruleset(self) -> str:
        """The table as nft lists it now, with drop counters (for debugging a test)."""
        return self.switch.run(["nft", "list", "table", "bridge", TABLE], timeout=30.0).stdout
