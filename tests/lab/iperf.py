"""Throughput between two lab namespaces with iperf3: one run, parsed into numbers a bench can assert.

The server is a one-off (`iperf3 -s -1`) started in the server namespace and waited for by its
listening socket, the client runs to completion with JSON output (`-J`), and the server is stopped
whatever happens. This module must never leave an iperf3 server running, and never guess a result:
an iperf3 error is raised with iperf3's own message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.lab.netns import Namespace


class IperfError(RuntimeError):
    """iperf3 failed or said something we cannot read as a result."""


@dataclass(frozen=True)
class IperfResult:
    protocol: str  # "tcp" or "udp"
    seconds: float  # measured duration on the receiving side
    sent_bytes: int
    received_bytes: int
    sent_gbps: float  # Gbit/s as the sender counted it
    received_gbps: float  # Gbit/s that arrived: the number to compare
    retransmits: int | None  # TCP only: the sender's retransmitted segments
    lost_percent: float | None  # UDP only
    jitter_ms: float | None  # UDP only
    raw: dict[str, Any] = field(repr=False, compare=False)  # iperf3's whole JSON report

    @property
    def gbits_per_second(self) -> float:
        """Received throughput in Gbit/s."""
        return self.received_gbps

    def describe(self) -> str:
        extra = (
            f", {self.retransmits} retransmits"
            if self.retransmits is not None
            else f", {self.lost_percent:.2f}% lost, jitter {self.jitter_ms:.3f} ms"
        )
        return f"{self.protocol} {self.received_gbps:.3f} Gbit/s over {self.seconds:.2f}s{extra}"


def parse_iperf3_json(text: str) -> IperfResult:
    """Read an iperf3 client's `-J` report (TCP or UDP) into an IperfResult."""
    try:
        report = json.loads(text)
    except ValueError as error:
        raise IperfError(f"iperf3 printed no JSON report ({error}): {text[:300]!r}") from None
    if not isinstance(report, dict):
        raise IperfError(f"iperf3 report is not a JSON object: {text[:300]!r}")
    if report.get("error"):
        raise IperfError(f"iperf3: {report['error']}")
    try:
        protocol = str(report["start"]["test_start"]["protocol"]).lower()
        end = report["end"]
        sent = end["sum_sent"] if "sum_sent" in end else end["sum"]
        received = end["sum_received"] if "sum_received" in end else end["sum"]
        return IperfResult(
            protocol=protocol,
            seconds=float(received["seconds"]),
            sent_bytes=int(sent["bytes"]),
            received_bytes=int(received["bytes"]),
            sent_gbps=float(sent["bits_per_second"]) / 1e9,
            received_gbps=float(received["bits_per_second"]) / 1e9,
            retransmits=int(sent["retransmits"]) if protocol == "tcp" and "retransmits" in sent else None,
            lost_percent=float(received["lost_percent"]) if protocol == "udp" else None,
            jitter_ms=float(received["jitter_ms"]) if protocol == "udp" else None,
            raw=report,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise IperfError(f"unexpected iperf3 report ({type(error).__name__}: {error})") from None


def iperf3(
    server: Namespace,
    client: Namespace,
    server_address: str,
    *,
    seconds: int = 2,
    udp: bool = False,
    bitrate: str | None = None,
    parallel: int = 1,
    reverse: bool = False,
    port: int = 5201,
    extra_args: Sequence[str] = (),
    connect_timeout: float = 10.0,
) -> IperfResult:
    """Run one iperf3 test from `client` to `server_address` (a server started in `server`).

    `seconds` is whole seconds (iperf3's -t). `bitrate` is iperf3's -b ("100M"; UDP defaults to
    1M without it). `reverse` makes the server send. `extra_args` go to the client.
    """
    if seconds < 1:
        raise ValueError("iperf3 measures whole seconds: seconds must be >= 1")
    process = server.start(["iperf3", "-s", "-1", "-p", str(port)], name=None)
    try:
        server.wait_listening(port, timeout=30.0)
        argv = ["iperf3", "-c", server_address, "-p", str(port), "-J", "-t", str(seconds)]
        argv += ["-P", str(parallel), "--connect-timeout", str(int(connect_timeout * 1000))]
        argv += ["-u"] if udp else []
        argv += ["-b", bitrate] if bitrate is not None else []
        argv += ["-R"] if reverse else []
        argv += list(extra_args)
        result = client.run(argv, check=False, timeout=seconds + connect_timeout + 60.0)
        try:
            return parse_iperf3_json(result.stdout)
        except IperfError as error:
            raise IperfError(
                f"{client.where} -> {server.where}: {error} (exit {result.returncode}; "
                f"stderr {result.stderr.strip()[-300:]!r}; server log {process.stdout_path})"
            ) from None
    finally:
        process.stop(timeout=5.0)
