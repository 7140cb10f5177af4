"""Views of the allocator's /report "IPAM" section: the `weavenet status` block, `status ipam`, metrics.

Pure functions of the report dict (as `mesh/status_text.py` is for the router), so the text and
the JSON never disagree. Layouts follow Weave Net's, which users and their scripts know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY_WIDTH = 15

Sample = tuple[str, str, dict[str, str], float]


def format_ipam_status(report: Mapping[str, Any]) -> str:
    """The IPAM block of `weavenet status`."""
    lines = [
        f"{'Service':>{KEY_WIDTH}}: ipam",
        f"{'Status':>{KEY_WIDTH}}: {report['Status']}",
        f"{'Range':>{KEY_WIDTH}}: {report['Range']}",
        f"{'DefaultSubnet':>{KEY_WIDTH}}: {report['DefaultSubnet']}",
    ]
    refused = report.get("Refused") or {}
    if refused:
        lines.append(f"{'Refused':>{KEY_WIDTH}}: rings from {len(refused)} peer(s); see 'weavenet status ipam'")
    if report.get("Disputed"):
        lines.append(f"{'Disputed':>{KEY_WIDTH}}: {', '.join(report['Disputed'])}")
    return "\n".join(lines) + "\n"


def format_ipam_peers(report: Mapping[str, Any]) -> str:
    """`weavenet status ipam`: per owner, IPs owned and % of the range; "(N active)" for us,
    "- unreachable!" for owners we cannot reach. Empty while there is no ring (as in Weave Net),
    followed by any refused rings and disputed addresses."""
    total = int(report["RangeNumIPs"]) or 1
    rows = []
    for owner in report.get("Owners") or []:
        who = f"{owner['Peer']}({owner['Nickname']})"
        line = f"{who:<40} {owner['Size']:>10} IPs ({100.0 * owner['Size'] / total:.1f}% of total)"
        if owner["Self"]:
            line += f" ({report['ActiveIPs']} active)"
        elif not owner["Reachable"]:
            line += " - unreachable!"
        rows.append(line)
    for peer, message in (report.get("Refused") or {}).items():
        rows.append(f"refused ring from {peer}: {message}")
    for disputed in report.get("Disputed") or []:
        rows.append(f"disputed: we hold addresses in {disputed}, now owned by another peer")
    for takeover in report.get("Takeovers") or []:
        rows.append(f"takeover of {takeover['Peer']}: awaiting confirmation ({takeover['Confirmed']} confirmed)")
    return "".join(row + "\n" for row in rows)


def ipam_metrics(report: Mapping[str, Any]) -> list[Sample]:
    """Weave Net's IPAM metrics, plus the count of rejected IPAM messages."""
    total = int(report["RangeNumIPs"])
    unreachable = [o for o in report.get("Owners") or [] if not o["Reachable"]]
    unreachable_ips = sum(int(o["Size"]) for o in unreachable)
    return [
        ("weave_ips", "Number of IP addresses.", {"state": "local-used"}, float(report["ActiveIPs"])),
        ("weave_max_ips", "Size of IP address space used by allocator.", {}, float(total)),
        ("weave_ipam_unreachable_count", "Number of unreachable peers.", {}, float(len(unreachable))),
        (
            "weave_ipam_unreachable_percentage",
            "Percentage of IP addresses owned by unreachable peers.",
            {},
            100.0 * unreachable_ips / total if total else 0.0,
        ),
        ("weave_ipam_pending_allocates", "Number of pending allocates.", {}, float(report["PendingAllocates"])),
        ("weave_ipam_pending_claims", "Number of pending claims.", {}, float(report["PendingClaims"])),
        (
            "weave_ipam_rejected_messages_total",
            "IPAM gossip messages refused (malformed, foreign range or cluster).",
            {},
            float(report["RejectedMessages"]),
        ),
    ]
