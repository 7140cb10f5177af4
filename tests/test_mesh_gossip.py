"""Gossip plumbing without sockets: coalescing senders, routing through the hub, surrogates, tie-break."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from weavenet.mesh import wire
from weavenet.mesh.connection import HEARTBEAT_FRAME, connection_uid, tie_break
from weavenet.mesh.gossip import (
    MAX_SURROGATES,
    ConnectionSender,
    GossipData,
    GossipError,
    GossipHub,
    GossipStats,
    OpaqueGossipData,
    UnknownRouteError,
)
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.routes import compute_routes
from weavenet.mesh.wire import ConnectionSummary, PeerSummary

US, A, B, C = (PeerName(0x0A0000000000 + i) for i in range(4))


class SetData:
    """Mergeable test data: a set of ints, encoded as one sorted payload."""

    def __init__(self, items: set[int]) -> None:
        self.items = set(items)

    def merge(self, other: SetData) -> SetData:
        self.items |= other.items
        return self

    def encode(self) -> list[bytes]:
        return [",".join(map(str, sorted(self.items))).encode()]


def test_tie_break_is_the_same_at_both_ends() -> None:
    ours, theirs = 0x1234, 0xFF00
    assert connection_uid(ours, theirs) == connection_uid(theirs, ours)
    first, second = connection_uid(1, 2), connection_uid(5, 9)
    assert tie_break(first, second) == "new" and tie_break(second, first) == "existing"
    assert tie_break(7, 7) == "both-die"


def test_sender_coalesces_gossip_while_the_link_is_blocked_and_serves_control_first() -> None:
    async def main() -> None:
        sender = ConnectionSender(US, A, GossipStats())
        written: list[bytes] = []
        gate = trio.Event()

        async def write(frame: bytes) -> None:
            await gate.wait()
            written.append(frame)

        async with trio.open_nursery() as nursery:
            sender.send_gossip("ipam", SetData({0}))
            nursery.start_soon(sender.run, write)
            await trio.testing.wait_all_tasks_blocked()  # the first frame is stuck in write()
            for i in range(1, 100):
                sender.send_gossip("ipam", SetData({i}))
                sender.send_broadcast("ipam", B, SetData({i}))
            sender.send_unicast(b"\x05unicast")
            sender.send_control(HEARTBEAT_FRAME)
            assert sender.backlog == 4, "99 gossips and 99 broadcasts became one of each"
            gate.set()
            while sender.backlog:
                await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        kinds = [frame[0] for frame in written]
        assert kinds == [wire.Tag.GOSSIP, wire.Tag.HEARTBEAT, 5, wire.Tag.GOSSIP, wire.Tag.GOSSIP_BROADCAST]
        merged = wire.decode_message(written[3])
        assert isinstance(merged, wire.Gossip)
        assert merged.payload == ",".join(str(i) for i in range(1, 100)).encode()

    trio.run(main)


def line_hub(local: PeerName) -> tuple[GossipHub, dict[PeerName, ConnectionSender]]:
    """A hub for `local` in the line A - US - B - C, with senders to its neighbours."""
    links = {A: [US], US: [A, B], B: [US, C], C: [B]}
    peers = {
        name: PeerSummary(name, "n", 1, 1, tuple(ConnectionSummary(p, "10.0.0.1:6783", True, True) for p in conns))
        for name, conns in links.items()
    }
    routes = compute_routes(local, peers)
    hub = GossipHub(local, lambda: routes, gossip_interval=lambda: 30.0)
    senders = {}
    for neighbour in links[local]:
        sender = hub.new_sender(neighbour)
        hub.attach(sender)
        senders[neighbour] = sender
    return hub, senders


class Recorder:
    def __init__(self) -> None:
        self.unicasts: list[tuple[PeerName, bytes]] = []
        self.broadcasts: list[tuple[PeerName, bytes]] = []
        self.gossips: list[bytes] = []

    def on_gossip(self, payload: bytes) -> GossipData | None:
        self.gossips.append(payload)
        return OpaqueGossipData([payload])

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        self.broadcasts.append((src, payload))
        return OpaqueGossipData([payload])

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        self.unicasts.append((src, payload))

    def gossip(self) -> GossipData | None:
        return OpaqueGossipData([b"full state"])


def queued(sender: ConnectionSender) -> list[wire.Message]:
    out = []
    while (frames := sender._take()) is not None:
        out.extend(wire.decode_message(f) for f in frames)
    return out


def test_unicast_is_routed_delivered_or_relayed_unchanged() -> None:
    hub, senders = line_hub(US)
    recorder = Recorder()
    channel = hub.register("ipam", recorder)
    channel.gossip_unicast(C, b"to C")
    assert queued(senders[B]) == [wire.GossipUnicast("ipam", US, C, b"to C")]
    assert queued(senders[A]) == []
    # A unicast from A to C passes through us unchanged; one to us is delivered.
    raw = wire.encode_message(wire.GossipUnicast("ipam", A, C, b"relay me"))
    hub.deliver(A, wire.decode_message(raw), raw)  # type: ignore[arg-type]
    assert queued(senders[B]) == [wire.GossipUnicast("ipam", A, C, b"relay me")]
    mine = wire.GossipUnicast("ipam", C, US, b"for us")
    hub.deliver(B, mine, wire.encode_message(mine))
    assert recorder.unicasts == [(C, b"for us")]


def test_unicast_to_an_unknown_peer_is_an_error() -> None:
    hub, _ = line_hub(US)
    channel = hub.register("ipam", Recorder())
    with pytest.raises(UnknownRouteError, match="no route to peer"):
        channel.gossip_unicast(PeerName(0x99), b"x")


def test_broadcast_follows_the_tree_of_its_source() -> None:
    hub, senders = line_hub(US)
    recorder = Recorder()
    hub.register("dns", recorder)
    msg = wire.GossipBroadcast("dns", A, b"from A")
    hub.deliver(A, msg, wire.encode_message(msg))
    assert recorder.broadcasts == [(A, b"from A")]
    assert queued(senders[B]) == [msg], "relayed on towards C"
    assert queued(senders[A]) == [], "never back to where it came from"


def test_gossip_sender_must_be_the_neighbour() -> None:
    hub, _ = line_hub(US)
    hub.register("dns", Recorder())
    forged = wire.Gossip("dns", C, b"x")
    with pytest.raises(wire.ProtocolError, match="claims to come from"):
        hub.deliver(A, forged, wire.encode_message(forged))


def test_unknown_channels_are_relayed_by_a_surrogate_that_drops_duplicates() -> None:
    async def main() -> None:
        hub, senders = line_hub(US)
        msg = wire.Gossip("future-thing", A, b"news")
        hub.deliver(A, msg, wire.encode_message(msg))
        assert queued(senders[B]) == [wire.Gossip("future-thing", US, b"news")]
        hub.deliver(A, msg, wire.encode_message(msg))
        assert queued(senders[B]) == [], "an exact duplicate within the gossip interval is dropped"
        # Unicasts for us on an unknown channel are dropped; broadcasts are relayed.
        uni = wire.GossipUnicast("future-thing", A, US, b"x")
        hub.deliver(A, uni, wire.encode_message(uni))
        bcast = wire.GossipBroadcast("future-thing", A, b"y")
        hub.deliver(A, bcast, wire.encode_message(bcast))
        assert queued(senders[B]) == [bcast]

    trio.run(main)


def test_full_state_down_a_new_connection_and_anti_entropy() -> None:
    hub, senders = line_hub(US)
    hub.register("ipam", Recorder())
    hub.send_all_down(B)
    assert queued(senders[B]) == [wire.Gossip("ipam", US, b"full state")]
    hub.gossip_all()
    assert queued(senders[A]) + queued(senders[B]) != []
    assert hub.stats.messages_in == {}


def test_a_flood_of_unknown_channels_is_refused() -> None:
    async def main() -> None:
        hub, _ = line_hub(US)
        for i in range(MAX_SURROGATES):
            msg = wire.Gossip(f"unknown-{i}", A, b"x")
            hub.deliver(A, msg, wire.encode_message(msg))
        msg = wire.Gossip("one-too-many", A, b"x")
        with pytest.raises(GossipError, match="too many unknown gossip channels"):
            hub.deliver(A, msg, wire.encode_message(msg))

    trio.run(main)
