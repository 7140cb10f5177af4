"""What the kernel fast path shows operators: its /report section and its Prometheus samples.

Pure reads of the controller's state (net/kernel_path.py); the counters it shows are the ones the
controller last read (KernelPath.read_counters, called by the API before it answers).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from weavenet.net import vxlan
from weavenet.net.kernel_path import FASTDP, REASONS_OFF, SLEEVE

if TYPE_CHECKING:
    from weavenet.net.kernel_path import KernelPath


def report(kernel: KernelPath) -> dict[str, Any]:
    """The `KernelPath` section of /report."""
    now = time.monotonic()
    return {
        "Enabled": kernel.enabled,
        "Device": vxlan.device_name(kernel.port) if kernel.open else None,
        "Port": kernel.port,
        "VNI": vxlan.VNI,
        "State": "up" if kernel.open else "off",
        "Problem": kernel.problem or None,
        "Peers": {
            str(name): {
                "Path": FASTDP if p.up else SLEEVE,
                "Reason": p.reason or None,
                "LastHeartbeat": round(now - p.heard_at, 3) if p.heard_at is not None else None,
                "PinnedMACs": sum(1 for r in kernel.pinned.values() if r == p.remote) - (1 if p.candidate else 0),
                "AnnouncedMACs": len(kernel.macs.of(p.peer)),
            }
            for name, p in sorted(kernel.peers.items())
        },
        "LocalMACs": len(kernel.local),
        "Fallbacks": dict(kernel.stats.fallbacks),
        "ForeignDropped": kernel.stats.foreign_dropped,
        "Frames": {"Out": kernel.stats.port.tx_frames, "In": kernel.stats.port.rx_frames},
        "BadHeartbeats": kernel.stats.bad_heartbeats,
        "BadAnnouncements": kernel.stats.bad_announcements,
    }


def metrics(kernel: KernelPath, sleeve: dict[str, Any]) -> list[tuple[str, str, dict[str, str], float]]:
    """Prometheus samples; `sleeve` is the Rust datapath's stats (for the other path's counters)."""
    port = kernel.stats.port
    frames = (
        "Frames carried between this host's bridge and the overlay, by path (fastdp: the kernel "
        "VXLAN port, heartbeats included; sleeve: the Rust datapath)."
    )
    octets = "Bytes carried between this host's bridge and the overlay, by path."
    samples: list[tuple[str, str, dict[str, str], float]] = []
    for path, direction, count, size in (
        (FASTDP, "out", port.tx_frames, port.tx_bytes),
        (FASTDP, "in", port.rx_frames, port.rx_bytes),
        (SLEEVE, "out", sleeve.get("tap_rx_frames", 0), sleeve.get("tap_rx_bytes", 0)),
        (SLEEVE, "in", sleeve.get("tap_tx_frames", 0), sleeve.get("tap_tx_bytes", 0)),
    ):
        labels = {"path": path, "direction": direction}
        samples.append(("weavenet_path_frames_total", frames, labels, float(count)))
        samples.append(("weavenet_path_bytes_total", octets, labels, float(size)))
    help_fallbacks = "Times a peer was taken off fastdp and carried on sleeve, by reason."
    for kind in ("heartbeat", "relayed", "unavailable", *sorted(kernel.stats.fallbacks.keys() - REASONS_OFF)):
        labels = {"reason": kind}
        samples.append(("weavenet_kernel_fallbacks_total", help_fallbacks, labels, float(kernel.stats.fallbacks[kind])))
    now: Counter[tuple[str, str]] = Counter((FASTDP if p.up else SLEEVE, p.kind) for p in kernel.peers.values())
    help_peers = "Connected peers by path, and for sleeve the reason (fastdp's is empty)."
    for (path, kind), count in sorted(now.items()):
        samples.append(("weavenet_kernel_peers", help_peers, {"path": path, "reason": kind}, float(count)))
    samples.append(
        (
            "weavenet_kernel_foreign_dropped_total",
            "Datagrams to the kernel path's UDP port from hosts that are not current peers, dropped.",
            {},
            float(kernel.stats.foreign_dropped),
        )
    )
    samples.append(
        (
            "weavenet_kernel_bad_heartbeats_total",
            "Heartbeat frames ignored (malformed, or from a peer not being probed).",
            {},
            float(kernel.stats.bad_heartbeats),
        )
    )
    samples.append(
        (
            "weavenet_kernel_bad_announcements_total",
            "MAC announcements refused (malformed or over the limits).",
            {},
            float(kernel.stats.bad_announcements),
        )
    )
    return samples
