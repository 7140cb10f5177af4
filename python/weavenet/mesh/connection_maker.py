"""Which addresses to dial and when (Weave Net's ConnectionMaker), as a state machine.

Targets are "host:port" strings: *direct* ones from the command line and `connect`, *discovered*
ones from the topology (an address some peer dialled, or a peer's IP with our port for links it
accepted). Each target is waiting (until `try_after`), attempting, connected, or suspended (a
direct target we need not dial right now). Failures back off with jitter: the next try falls
uniformly in [i/2, 3i/2), with i starting at `backoff_base`, growing ×1.5 and capped at
`backoff_cap`. A connection that lived `reset_after` past its try resets to an immediate retry.
Dialling ourselves or a name collision is never retried; a wrong password only after the cap.

This module decides; it never dials. The router asks `due()` what to dial, reports the outcome
back, and sleeps until `next_wakeup()` or a change. Time comes in as arguments (trio's clock in
the router, plain numbers in tests), so everything here is deterministic under a seeded RNG.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.wire import PeerSummary

DEFAULT_PORT = 6783


class TargetState(enum.Enum):
    WAITING = "waiting"
    ATTEMPTING = "attempting"
    CONNECTED = "connected"
    SUSPENDED = "suspended"


class Failure(enum.Enum):
    """How a failed attempt or a dropped connection affects the next try."""

    TRANSIENT = "transient"  # back off and retry
    AUTH = "auth"  # wrong password or similar: retry only after the longest backoff
    NEVER = "never"  # connect to self, peer name collision: do not retry


@dataclass
class Target:
    address: str
    state: TargetState = TargetState.WAITING
    last_error: str | None = None
    try_after: float | None = 0.0  # None = never
    interval: float = 0.0


def parse_target(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, str]:
    """Normalise `host[:port]` into (target address, host). Raises ValueError with a one-line reason."""
    text = text.strip()
    if not text:
        raise ValueError("empty peer address")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid peer {text!r}, should be host[:port]")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"invalid peer {text!r}, should be host[:port]")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            raise ValueError(f"invalid peer {text!r}, should be host[:port]")
        port = int(port_text)
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"invalid peer {text!r}, should be host[:port]") from None
    if not host or not 0 < port <= 65535 or any(c.isspace() or c in "/@" for c in host):
        raise ValueError(f"invalid peer {text!r}, should be host[:port]")
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), host


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class LiveConnection:
    """What the maker needs to know about one of our connections."""

    peer: PeerName
    address: str  # the remote TCP address, "ip:port"
    outbound: bool
    target: str | None  # the target this connection was dialled for


class ConnectionMaker:
    """Targets and their retry state. All methods are synchronous and cheap."""

    def __init__(
        self,
        *,
        port: int,
        discovery: bool = True,
        backoff_base: float = 2.0,
        backoff_cap: float = 360.0,
        reset_after: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.port = port
        self.discovery = discovery
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.reset_after = reset_after
        self._rng = rng or random.Random()
        self.direct: dict[str, str] = {}  # target address -> the text the user gave
        self.targets: dict[str, Target] = {}
        self._never: dict[str, str] = {}  # addresses that turned out to be us (or a name collision)
        self.termination_count = 0

    # -- what users ask for ------------------------------------------------------------------

    def connect(self, peers: Sequence[str], *, replace: bool, now: float) -> list[str]:
        """Add direct targets (or replace the set). Returns one error line per unparsable peer."""
        errors: list[str] = []
        parsed: dict[str, str] = {}
        for text in peers:
            try:
                address, _ = parse_target(text, self.port)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            parsed[address] = text.strip()
        if errors:
            return errors
        if replace:
            self.direct = {}
        for address, text in parsed.items():
            self.direct[address] = text
            self._never.pop(address, None)
            target = self.targets.get(address)
            if target is not None and target.state is not TargetState.ATTEMPTING:
                self._try_now(target, now)
        return []

    def forget(self, peers: Sequence[str]) -> None:
        for text in peers:
            try:
                address, _ = parse_target(text, self.port)
            except ValueError:
                continue
            self.direct.pop(address, None)

    def direct_targets(self) -> list[str]:
        return sorted(self.direct.values())

    # -- the loop's questions ----------------------------------------------------------------

    def refresh(
        self,
        connections: Iterable[LiveConnection],
        peers: Iterable[PeerSummary],
        local: PeerName,
        now: float,
        room: int | None = None,
    ) -> list[str]:
        """Recompute the valid targets; returns the addresses to dial now (marked attempting).

        `room` caps how many new attempts may start (conn-limit); None = no limit.
        """
        conns = list(connections)
        connected_peers = {c.peer for c in conns}
        connected_addresses = {c.address for c in conns} | {c.target for c in conns if c.target}
        inbound_ips = {split_address(c.address)[0] for c in conns if not c.outbound}
        valid: set[str] = set()

        def add(address: str, direct: bool = False) -> None:
            if address in connected_addresses:
                return
            if address in self._never and not direct:
                return  # discovered, and known to be us: do not even list it
            valid.add(address)
            if address not in self.targets:
                self.targets[address] = Target(address, interval=self.backoff_base)

        for address in self.direct:
            host, port = split_address(address)
            if port == self.port and host in inbound_ips:
                continue  # that peer already dialled us
            add(address, direct=True)
        if self.discovery:
            for record in peers:
                if record.name == local:
                    continue
                for conn in record.connections:
                    if conn.peer == local or conn.peer in connected_peers:
                        continue
                    if conn.outbound:
                        add(conn.address)
                    else:
                        ip, _ = split_address(conn.address)
                        add(f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}")

        due: list[str] = []
        for address, target in list(self.targets.items()):
            if target.state not in (TargetState.WAITING, TargetState.SUSPENDED):
                continue
            if address not in valid:
                if address in self.direct:
                    target.state = TargetState.SUSPENDED
                else:
                    del self.targets[address]
                continue
            target.state = TargetState.WAITING
            if target.try_after is None or target.try_after > now:
                continue
            if room is not None and len(due) >= room:
                continue
            target.state = TargetState.ATTEMPTING
            due.append(address)
        return due

    def next_wakeup(self) -> float | None:
        """The earliest time a waiting target becomes due, or None."""
        times = [
            t.try_after for t in self.targets.values() if t.state is TargetState.WAITING and t.try_after is not None
        ]
        return min(times) if times else None

    # -- outcomes ----------------------------------------------------------------------------

    def attempt_failed(self, address: str, error: str, failure: Failure, now: float) -> None:
        """A dial or handshake failed before the connection was added."""
        target = self.targets.get(address)
        if target is None:
            return
        target.state = TargetState.WAITING
        target.last_error = error
        self._after_failure(target, failure, now)

    def connected(self, address: str) -> None:
        target = self.targets.get(address)
        if target is not None:
            target.state = TargetState.CONNECTED
            target.last_error = None

    def terminated(self, address: str | None, error: str, failure: Failure, now: float) -> None:
        """A connection we had added has gone (`address` is its target if we dialled it)."""
        if failure is not Failure.NEVER:
            self.termination_count += 1
        if address is None:
            return
        target = self.targets.get(address)
        if target is None:
            return
        target.state = TargetState.WAITING
        target.last_error = error
        if failure is Failure.TRANSIENT and target.try_after is not None and now >= target.try_after + self.reset_after:
            self._try_now(target, now)  # it was a good connection for a while: redial at once
        else:
            self._after_failure(target, failure, now)

    # -- backoff -----------------------------------------------------------------------------

    def _try_now(self, target: Target, now: float) -> None:
        target.try_after = now
        target.interval = self.backoff_base

    def _after_failure(self, target: Target, failure: Failure, now: float) -> None:
        if failure is Failure.NEVER:
            target.try_after = None
            target.interval = self.backoff_cap
            self._never[target.address] = target.last_error or "not retried"
            return
        if failure is Failure.AUTH:
            target.interval = self.backoff_cap
        interval = target.interval or self.backoff_base
        target.try_after = now + interval / 2 + self._rng.random() * interval
        target.interval = min(interval * 1.5, self.backoff_cap)

    # -- status ------------------------------------------------------------------------------

    def status(self, now: float) -> list[dict[str, object]]:
        """Targets as /report Connections entries (connected ones are reported by their connection)."""
        out: list[dict[str, object]] = []
        for address in sorted(self.targets):
            target = self.targets[address]
            if target.state is TargetState.WAITING:
                until = "never" if target.try_after is None else f"in {max(0.0, target.try_after - now):.1f}s"
                if target.last_error is None:
                    out.append(_status(address, "waiting", f"until: {until}"))
                else:
                    out.append(_status(address, "failed", f"{target.last_error}, retry: {until}"))
            elif target.state is TargetState.ATTEMPTING:
                if target.last_error is None:
                    out.append(_status(address, "connecting", ""))
                else:
                    out.append(_status(address, "retrying", target.last_error))
        return out


def _status(address: str, state: str, info: str) -> dict[str, object]:
    return {"Address": address, "Outbound": True, "State": state, "Info": info, "Attrs": None}
