"""Text views of the router's /report section, in the layouts Weave Net users (and their scripts) know.

`format_status` is the router block of `weavenet status` (right-aligned `Key: value` lines);
`format_connections`, `format_peers` and `format_targets` are `status connections|peers|targets`.
Pure functions of the report dict, so the API serves exactly what the JSON says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

CONNECTION_STATES = ("established", "pending", "retrying", "failed", "connecting")
KEY_WIDTH = 15


def _line(key: str, value: object) -> str:
    return f"{key:>{KEY_WIDTH}}: {value}"


def _counts(values: Iterable[str], order: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in order if k in counts)


def _enabled(flag: object) -> str:
    return "enabled" if flag else "disabled"


def format_status(report: Mapping[str, Any]) -> str:
    """The router block of `weavenet status`."""
    low, high = report["ProtocolMinVersion"], report["ProtocolMaxVersion"]
    protocol = f"{report['Protocol']} {high}" if low == high else f"{report['Protocol']} {low}..{high}"
    connections = report.get("Connections") or []
    peers = report.get("Peers") or []
    conn_counts = _counts((c["State"] for c in connections), CONNECTION_STATES)
    peer_counts = _counts(
        ("established" if c["Established"] else "pending" for p in peers for c in p.get("Connections") or []),
        ("established", "pending"),
    )
    lines = [
        _line("Service", "router"),
        _line("Protocol", protocol),
        _line("Name", f"{report['Name']}({report['NickName']})"),
        _line("Encryption", _enabled(report["Encryption"])),
        _line("PeerDiscovery", _enabled(report["PeerDiscovery"])),
        _line("Targets", len(report.get("Targets") or [])),
        _line("Connections", f"{len(connections)}" + (f" ({conn_counts})" if conn_counts else "")),
        _line("Peers", f"{len(peers)}" + (f" (with {peer_counts} connections)" if peer_counts else "")),
        _line("TrustedSubnets", ", ".join(report.get("TrustedSubnets") or []) or "none"),
    ]
    return "\n".join(lines) + "\n"


def format_fast_path(kernel: Mapping[str, Any]) -> str:
    """The kernel fast path's line of `weavenet status`: where it listens, and how many peers use it."""
    peers = kernel.get("Peers") or {}
    counts = _counts((p["Path"] for p in peers.values()), ("fastdp", "sleeve"))
    if kernel.get("State") == "up":
        where = f"kernel VXLAN on UDP {kernel['Port']} ({kernel['Device']})"
    else:
        where = f"off ({kernel.get('Problem') or 'not started'})"
    return _line("FastPath", where + (f", peers: {counts}" if counts else "")) + "\n"


def format_connections(report: Mapping[str, Any]) -> str:
    """`status connections` in Weave Net's layout, `-> 10.0.0.2:6783  established fastdp aa:bb:..(nick)
    mtu=1420`, the path being `fastdp` (kernel) or `sleeve` (userspace); a sleeve line ends with why
    it is not on fastdp, in parentheses."""
    lines = []
    for conn in report.get("Connections") or []:
        arrow = "->" if conn["Outbound"] else "<-"
        attrs = conn.get("Attrs") or {}
        hidden = ("name", "encrypted", "fallback")
        extra = " ".join(f"{k}={_attr(v)}" for k, v in sorted(attrs.items()) if k not in hidden)
        why = f" ({attrs['fallback']})" if attrs.get("fallback") else ""
        line = f"{arrow} {conn['Address']:<21} {conn['State']:<11} {conn['Info']} {extra}".rstrip() + why
        lines.append(line.rstrip())
    return "".join(line + "\n" for line in lines)


def _attr(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_peers(report: Mapping[str, Any]) -> str:
    """`status peers`: each peer, then its connections indented."""
    lines = []
    for peer in report.get("Peers") or []:
        lines.append(f"{peer['Name']}({peer['NickName']})")
        for conn in peer.get("Connections") or []:
            arrow = "->" if conn["Outbound"] else "<-"
            who = f"{conn['Name']}({conn['NickName']})"
            state = "established" if conn["Established"] else "pending"
            lines.append(f"   {arrow} {conn['Address']:<21} {who:<37} {state}")
    return "".join(line + "\n" for line in lines)


def format_targets(report: Mapping[str, Any]) -> str:
    """`status targets`: one direct target per line."""
    return "".join(f"{target}\n" for target in report.get("Targets") or [])
