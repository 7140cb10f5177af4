"""Link faults between lab hosts (cut, heal, isolate, rejoin) as nftables drops in the lab's switch.

The switch namespace gets one table, `bridge wnlab`, whose forward chain drops frames between two
switch ports (a cut) or from and to one port (an isolated host). Ports are named after hosts. Why in
the switch rather than inside the hosts:
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


def render(cuts: Iterable[tuple[str, str]], isolated: Iterable[str]) -> str:
    """The nft script that replaces the switch's lab table with this state (pure; no side effects).

    `cuts` are pairs of switch ports (either order; both directions are dropped); `isolated` ports
    exchange nothing with any other port.
    """
    pairs = sorted({pair for a, b in cuts for pair in ((a, b), (b, a))})
    ports = sorted(set(isolated))
    for port in [*ports, *(port for pair in pairs for port in pair)]:
        check_ifname(port)
    cut_elements = ", ".join(f'"{a}" . "{b}"' for a, b in pairs)
    isolated_elements = ", ".join(f'"{port}"' for port in ports)
    return (
        # "add" first so that "delete" cannot fail: together they replace the table atomically.
        f"add table bridge {TABLE}\n"
        f"delete table bridge {TABLE}\n"
        f"table bridge {TABLE} {{\n"
        f"    set cut_pairs {{\n"
        f"        type ifname . ifname\n" + (f"        elements = {{ {cut_elements} }}\n" if pairs else "") + "    }\n"
        "    set isolated {\n"
        "        type ifname\n" + (f"        elements = {{ {isolated_elements} }}\n" if ports else "") + "    }\n"
        "    chain forward {\n"
        f"        type filter hook forward priority {PRIORITY}; policy accept;\n"
        "        iifname @isolated counter drop\n"
        "        oifname @isolated counter drop\n"
        "        iifname . oifname @cut_pairs counter drop\n"
        "    }\n"
        "}\n"
    )


class SwitchFirewall:
    """The fault state of a lab's switch: which port pairs are cut, which ports are isolated."""

    def __init__(self, switch: Namespace) -> None:
        self.switch = switch
        self.cuts: set[frozenset[str]] = set()
        self.isolated: set[str] = set()

    def apply(self) -> None:
        """Write the current state into the switch's table (one atomic nft transaction)."""
        script = render([(min(pair), max(pair)) for pair in self.cuts], self.isolated)
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

    def heal_all(self) -> None:
        """Undo every cut and every isolation."""
        self.cuts.clear()
        self.isolated.clear()
        self.apply()

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.cuts

    def cut_from(self, port: str) -> list[str]:
        """The ports `port` is cut from (not counting isolation)."""
        return sorted(other for pair in self.cuts if port in pair for other in pair if other != port)

    def ruleset(self) -> str:
        """The table as nft lists it now, with drop counters (for debugging a test)."""
        return self.switch.run(["nft", "list", "table", "bridge", TABLE], timeout=30.0).stdout
