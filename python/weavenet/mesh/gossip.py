"""Gossip channels: the one small interface IPAM, DNS and the topology plug into (weaveworks/mesh's).

A subsystem implements `Gossiper` and gets a `GossipChannel` from the router. It can then send
  - `gossip_unicast(dst, payload)`: routed hop by hop over `unicast_all` to one peer;
  - `gossip_broadcast(data)`: along our broadcast tree; each receiver relays what was new to it
    along the tree for our source;
  - `gossip_neighbourhood(data)`: to a few random neighbours; receivers pass on what was new to them.
and never sees a connection. Each connection has one `ConnectionSender` holding, per channel, one
pending gossip value and one pending broadcast value per source: new data merges into what is
pending, so a slow link coalesces updates instead of queueing them. Channels nobody here registered
get a *surrogate* that relays them (dropping exact duplicates for one gossip interval), so routers
running different feature sets can still carry each other's traffic.

Everything here runs on the trio loop and never blocks it; gossiper callbacks must be quick.
A gossiper that rejects a payload raises `GossipError`, which closes the connection it came on.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, Self, runtime_checkable

import trio

from weavenet.mesh import wire
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.routes import Routes

log = logging.getLogger("weavenet.mesh.gossip")

MAX_UNICAST_BACKLOG = 4096  # frames queued per connection before the oldest are dropped
MAX_SURROGATES = 64  # unknown channels relayed at once; more are a misbehaving peer's, not a feature


class GossipError(Exception):
    """A gossiper rejected a payload from a peer (bad data): the connection it came on is closed."""


class UnknownRouteError(Exception):
    """No route to the destination of a unicast (it is not (yet) reachable)."""


@runtime_checkable
class GossipData(Protocol):
    """Mergeable state to send: `merge` folds newer data in (and may return self), `encode` gives payloads."""

    def merge(self, other: Self) -> Self: ...

    def encode(self) -> list[bytes]: ...


class Gossiper(Protocol):
    """What a subsystem implements to use a channel. Callbacks run on the trio loop: keep them short."""

    def on_gossip(self, payload: bytes) -> GossipData | None:
        """Merge neighbour gossip; return what was new to us (relayed onwards), or None."""
        ...

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        """Merge a broadcast from `src`; return what to relay along `src`'s tree, or None."""
        ...

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        """A unicast addressed to us from `src`."""
        ...

    def gossip(self) -> GossipData | None:
        """Our full state, for anti-entropy and for peers we have just connected to."""
        ...


class OpaqueGossipData:
    """Payloads with no merge semantics of their own: merging keeps each distinct payload once, in order."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads

    def merge(self, other: OpaqueGossipData) -> OpaqueGossipData:
        seen = set(self.payloads)
        self.payloads.extend(p for p in other.payloads if p not in seen)
        return self

    def encode(self) -> list[bytes]:
        return list(self.payloads)


def _as_data(data: GossipData | bytes) -> GossipData:
    return OpaqueGossipData([bytes(data)]) if isinstance(data, bytes | bytearray) else data


# --------------------------------------------------------------------------------------------
# Counters


@dataclass
class GossipStats:
    """Messages and bytes in and out, by message kind ("gossip", "unicast", "broadcast")."""

    messages_in: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)
    messages_out: dict[str, int] = field(default_factory=dict)
    bytes_out: dict[str, int] = field(default_factory=dict)
    dropped: int = 0

    def count_in(self, kind: str, size: int) -> None:
        self.messages_in[kind] = self.messages_in.get(kind, 0) + 1
        self.bytes_in[kind] = self.bytes_in.get(kind, 0) + size

    def count_out(self, kind: str, size: int) -> None:
        self.messages_out[kind] = self.messages_out.get(kind, 0) + 1
        self.bytes_out[kind] = self.bytes_out.get(kind, 0) + size


_KIND_OF_TAG = {
    wire.Tag.GOSSIP: "gossip",
    wire.Tag.GOSSIP_UNICAST: "unicast",
    wire.Tag.GOSSIP_BROADCAST: "broadcast",
}


# --------------------------------------------------------------------------------------------
# Per-connection sender


class ConnectionSender:
    """The outgoing side of one connection: control frames, unicasts, then coalesced gossip.

    Order of service: control (heartbeats, overlay control) → unicast frames → neighbour gossip
    → broadcasts. Gossip and broadcasts are kept as mergeable values and encoded only when the
    link can take them, so a slow link always sends the latest merged state once.
    """

    def __init__(self, local: PeerName, peer: PeerName, stats: GossipStats) -> None:
        self.local = local
        self.peer = peer
        self._stats = stats
        self._control: deque[bytes] = deque()
        self._unicast: deque[bytes] = deque()
        self._gossip: dict[str, GossipData] = {}
        self._broadcast: dict[tuple[str, PeerName], GossipData] = {}
        self._wake = trio.Event()

    def send_control(self, frame: bytes) -> None:
        self._control.append(frame)
        self._wake.set()

    def send_unicast(self, frame: bytes) -> None:
        if len(self._unicast) >= MAX_UNICAST_BACKLOG:
            self._unicast.popleft()
            self._stats.dropped += 1
            log.warning("unicast backlog to %s is full: dropped the oldest message", self.peer)
        self._unicast.append(frame)
        self._wake.set()

    def send_gossip(self, channel: str, data: GossipData) -> None:
        pending = self._gossip.get(channel)
        self._gossip[channel] = data if pending is None else pending.merge(data)
        self._wake.set()

    def send_broadcast(self, channel: str, src: PeerName, data: GossipData) -> None:
        key = (channel, src)
        pending = self._broadcast.get(key)
        self._broadcast[key] = data if pending is None else pending.merge(data)
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._control) + len(self._unicast) + len(self._gossip) + len(self._broadcast)

    def _take(self) -> list[bytes] | None:
        if self._control:
            return [self._control.popleft()]
        if self._unicast:
            return [self._unicast.popleft()]
        if self._gossip:
            channel = next(iter(self._gossip))
            data = self._gossip.pop(channel)
            return self._frames(data, lambda p: wire.Gossip(channel, self.local, p), channel)
        if self._broadcast:
            (channel, src) = key = next(iter(self._broadcast))
            data = self._broadcast.pop(key)
            return self._frames(data, lambda p: wire.GossipBroadcast(channel, src, p), channel)
        return None

    def _frames(self, data: GossipData, wrap: Callable[[bytes], wire.Message], channel: str) -> list[bytes]:
        frames = []
        try:
            payloads = data.encode()
        except Exception:
            log.exception("channel %s failed to encode its gossip (a bug in that subsystem): not sent", channel)
            self._stats.dropped += 1
            return []
        for payload in payloads:
            if len(payload) > wire.MAX_GOSSIP_PAYLOAD:
                log.error(
                    "channel %s produced a %d-byte payload, over the %d-byte limit: not sent (a bug in that subsystem)",
                    channel,
                    len(payload),
                    wire.MAX_GOSSIP_PAYLOAD,
                )
                self._stats.dropped += 1
                continue
            frames.append(wire.encode_message(wrap(payload)))
        return frames

    async def run(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Drain the queues into `write` (the connection's channel send) until cancelled."""
        while True:
            frames = self._take()
            if frames is None:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            for frame in frames:
                await write(frame)
                kind = _KIND_OF_TAG.get(wire.Tag(frame[0]))
                if kind is not None:
                    self._stats.count_out(kind, len(frame))


# --------------------------------------------------------------------------------------------
# Channels


class _Surrogate:
    """Stands in for a channel nobody registered here: relays it, keeps nothing."""

    def __init__(self, name: str, window: Callable[[], float]) -> None:
        self.name = name
        self._window = window
        self._seen: dict[bytes, float] = {}  # digest -> expiry

    def on_gossip(self, payload: bytes) -> GossipData | None:
        now = trio.current_time()
        if len(self._seen) > 1024 or any(t <= now for t in self._seen.values()):
            self._seen = {d: t for d, t in self._seen.items() if t > now}
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest in self._seen:
            return None
        self._seen[digest] = now + self._window()
        return OpaqueGossipData([payload])

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        return OpaqueGossipData([payload])

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        log.debug("unicast from %s on channel %s, which nothing here handles: ignored", src, self.name)

    def gossip(self) -> GossipData | None:
        return None


def _full_state(channel: str, gossiper: Gossiper) -> GossipData | None:
    try:
        return gossiper.gossip()
    except Exception:
        log.exception("channel %s failed to produce its full state (a bug in that subsystem)", channel)
        return None


class GossipChannel:
    """A subsystem's handle on one named channel. Sending never blocks; it queues on connections."""

    def __init__(self, name: str, hub: GossipHub) -> None:
        self.name = name
        self._hub = hub

    def gossip_unicast(self, dst: PeerName, payload: bytes) -> None:
        """Send `payload` to peer `dst`. Raises UnknownRouteError if `dst` is not reachable now."""
        self._hub.unicast(self.name, self._hub.local, dst, payload)

    def gossip_broadcast(self, data: GossipData | bytes) -> None:
        """Send to every reachable peer along our broadcast tree."""
        self._hub.relay_broadcast(self.name, self._hub.local, _as_data(data))

    def gossip_neighbourhood(self, data: GossipData | bytes) -> None:
        """Send to a few random neighbours; they pass on whatever was new to them."""
        self._hub.relay_gossip(self.name, _as_data(data), exclude=None)


class GossipHub:
    """All channels and all connection senders of one router; routes messages between them."""

    def __init__(
        self,
        local: PeerName,
        routes: Callable[[], Routes],
        *,
        gossip_interval: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.local = local
        self._routes = routes
        self._gossip_interval = gossip_interval
        self._rng = rng or random.Random()
        self._gossipers: dict[str, Gossiper] = {}
        self._surrogates: dict[str, _Surrogate] = {}
        self._senders: dict[PeerName, ConnectionSender] = {}
        self.stats = GossipStats()

    # -- registration --------------------------------------------------------------------------

    def register(self, name: str, gossiper: Gossiper) -> GossipChannel:
        if not wire.valid_channel_name(name):
            raise ValueError(f"invalid gossip channel name {name!r}: use 1-64 characters of [A-Za-z0-9._-]")
        if name in self._gossipers:
            raise ValueError(f"gossip channel {name!r} is already registered")
        self._gossipers[name] = gossiper
        self._surrogates.pop(name, None)
        return GossipChannel(name, self)

    def channel_names(self) -> list[str]:
        return sorted(self._gossipers)

    def new_sender(self, peer: PeerName) -> ConnectionSender:
        return ConnectionSender(self.local, peer, self.stats)

    def attach(self, sender: ConnectionSender) -> None:
        """Make `sender` the way to reach its peer (called once the connection is added)."""
        self._senders[sender.peer] = sender

    def detach(self, sender: ConnectionSender) -> None:
        if self._senders.get(sender.peer) is sender:
            del self._senders[sender.peer]

    def _gossiper(self, channel: str) -> Gossiper:
        gossiper = self._gossipers.get(channel)
        if gossiper is not None:
            return gossiper
        surrogate = self._surrogates.get(channel)
        if surrogate is None:
            if len(self._surrogates) >= MAX_SURROGATES:
                raise GossipError(f"too many unknown gossip channels (at {channel!r}); limit {MAX_SURROGATES}")
            log.info("relaying gossip channel %r as a surrogate (no subsystem here handles it)", channel)
            surrogate = self._surrogates[channel] = _Surrogate(channel, self._gossip_interval)
        return surrogate

    # -- sending -------------------------------------------------------------------------------

    def unicast(self, channel: str, src: PeerName, dst: PeerName, payload: bytes) -> None:
        if len(payload) > wire.MAX_GOSSIP_PAYLOAD:
            raise ValueError(f"unicast payload of {len(payload)} bytes exceeds the limit ({wire.MAX_GOSSIP_PAYLOAD})")
        self._relay_unicast(dst, wire.encode_message(wire.GossipUnicast(channel, src, dst, payload)))

    def _relay_unicast(self, dst: PeerName, frame: bytes) -> None:
        hop = self._routes().unicast_all.get(dst)
        sender = self._senders.get(hop) if hop is not None else None
        if sender is None:
            raise UnknownRouteError(f"no route to peer {dst}")
        sender.send_unicast(frame)

    def relay_broadcast(self, channel: str, src: PeerName, data: GossipData) -> None:
        for hop in self._routes().broadcast_all(src):
            sender = self._senders.get(hop)
            if sender is not None:
                sender.send_broadcast(channel, src, data)

    def relay_gossip(self, channel: str, data: GossipData, exclude: PeerName | None) -> None:
        for hop in self._routes().random_neighbours(exclude, self._rng):
            sender = self._senders.get(hop)
            if sender is not None:
                sender.send_gossip(channel, data)

    def send_all_down(self, peer: PeerName) -> None:
        """Full state of every channel straight down the connection to `peer` (new or restarted peer)."""
        sender = self._senders.get(peer)
        if sender is None:
            return
        for channel, gossiper in self._gossipers.items():
            data = _full_state(channel, gossiper)
            if data is not None:
                sender.send_gossip(channel, data)

    def gossip_all(self) -> None:
        """Anti-entropy: every channel's full state to random neighbours."""
        for channel, gossiper in self._gossipers.items():
            data = _full_state(channel, gossiper)
            if data is not None:
                self.relay_gossip(channel, data, exclude=None)

    # -- receiving -----------------------------------------------------------------------------

    def deliver(
        self, neighbour: PeerName, message: wire.Gossip | wire.GossipUnicast | wire.GossipBroadcast, raw: bytes
    ) -> None:
        """Handle one gossip message from the connection to `neighbour`.

        Raises wire.ProtocolError for messages that break the protocol and GossipError when the
        channel's gossiper rejects the payload; either closes that connection.
        """
        match message:
            case wire.Gossip(channel, sender, payload):
                self.stats.count_in("gossip", len(raw))
                if sender != neighbour:
                    raise wire.ProtocolError(f"gossip claims to come from {sender} on the connection to {neighbour}")
                update = self._gossiper(channel).on_gossip(payload)
                if update is not None:
                    self.relay_gossip(channel, update, exclude=neighbour)
            case wire.GossipUnicast(channel, src, dst, payload):
                self.stats.count_in("unicast", len(raw))
                if dst == self.local:
                    self._gossiper(channel).on_gossip_unicast(src, payload)
                    return
                try:
                    self._relay_unicast(dst, raw)
                except UnknownRouteError:
                    self.stats.dropped += 1
                    log.debug("unicast on %s from %s to %s: no route from here, dropped", channel, src, dst)
            case wire.GossipBroadcast(channel, src, payload):
                self.stats.count_in("broadcast", len(raw))
                if src == self.local:
                    return  # our own broadcast came back round a topology change
                update = self._gossiper(channel).on_gossip_broadcast(src, payload)
                if update is not None:
                    self.relay_broadcast(channel, src, update)
