"""The mesh message schema: good messages round-trip; anything else is a typed ProtocolError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weavenet.mesh import wire
from weavenet.mesh.peer_name import PeerName

A, B = PeerName(0x0A0000000001), PeerName(0x0A0000000002)


def body(tag: int, fields: object) -> bytes:
    return bytes([tag]) + msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize(
    "message",
    [
        wire.Heartbeat(),
        wire.Gossip("topology", A, b"\x00payload"),
        wire.GossipUnicast("IPallocation", A, B, b""),
        wire.GossipBroadcast("nameserver", B, b"x" * 1000),
        wire.OverlayControl(3, b"ctl"),
    ],
)
def test_messages_round_trip(message: wire.Message) -> None:
    assert wire.decode_message(wire.encode_message(message)) == message


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"", "empty"),
        (b"\x09", "unknown message tag 9"),
        (b"\x01", "unknown message tag 1"),
        (b"\x00extra", "heartbeat with a body"),
        (b"\x04", "not valid msgpack"),  # truncated: tag only
        (body(4, ["topology", 1, b"x"])[:-1], "not valid msgpack"),  # truncated payload
        (body(4, ["topology", 1, b"x"]) + b"\x00", "trailing bytes"),
        (b"\x04\xc1", "not valid msgpack"),  # reserved msgpack byte
        (b"\x04" + b"\x91" * 5000, "not valid msgpack"),  # nesting bomb
        (body(4, {"a": 1}), "not an array"),
        (body(4, ["topology", 1]), "has 2 fields"),
        (body(4, [b"topology", 1, b"x"]), "channel name"),  # bytes where text is due
        (body(4, ["bad channel!", 1, b"x"]), "channel name"),
        (body(4, ["", 1, b"x"]), "channel name"),
        (body(4, ["topology", 0, b"x"]), "peer name"),
        (body(4, ["topology", 1 << 48, b"x"]), "peer name"),
        (body(4, ["topology", -1, b"x"]), "peer name"),
        (body(4, ["topology", True, b"x"]), "peer name"),  # bools are not ints here
        (body(4, ["topology", 1, "text"]), "must be binary"),
        (body(5, ["c", 1, 2.5, b"x"]), "unicast destination"),
        (body(7, [256, b"x"]), "subtag"),
    ],
)
def test_garbage_is_a_protocol_error(data: bytes, complaint: str) -> None:
    with pytest.raises(wire.ProtocolError, match=complaint):
        wire.decode_message(data)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        wire.decode_message(b"\x04" + b"\x00" * wire.MAX_MESSAGE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_message(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_topology_bytes_are_typed_errors(data: bytes) -> None:
    with contextlib.suppress(wire.ProtocolError):
        wire.decode_topology(data)


def intro(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {"v": 1, "name": int(A), "nick": "host1", "uid": 7, "conn_id": 9, "trusted": False}
    fields.update(overrides)
    return fields


def test_intro_round_trip() -> None:
    value = wire.Intro(A, "host1", uid=5, conn_id=(1 << 64) - 1, trusted=True, overlays=("sleeve",))
    assert wire.decode_intro(wire.encode_intro(value)) == value


def test_intro_ignores_unknown_fields_for_later_versions() -> None:
    decoded = wire.decode_intro(msgpack.packb(intro(v=2, future="x")))
    assert decoded.name == A and decoded.nickname == "host1"


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        (intro(uid=0), "uid must not be zero"),
        (intro(uid=-1), "uid"),
        (intro(v=0), "version"),
        (intro(nick="a\nb"), "nickname"),
        (intro(nick="x" * 300), "nickname"),
        (intro(trusted="yes"), "trusted"),
        (intro(overlays="fastdp"), "overlays"),
        ({k: v for k, v in intro().items() if k != "conn_id"}, "conn_id"),
    ],
)
def test_bad_intros(fields: dict[str, object], complaint: str) -> None:
    with pytest.raises(wire.ProtocolError, match=complaint):
        wire.decode_intro(msgpack.packb(fields))


def test_intro_that_is_not_a_map() -> None:
    with pytest.raises(wire.ProtocolError, match="not a map"):
        wire.decode_intro(msgpack.packb([1, 2, 3]))


def peer(name: PeerName, version: int = 1, conns: tuple[wire.ConnectionSummary, ...] = ()) -> wire.PeerSummary:
    return wire.PeerSummary(name, f"n{int(name) & 0xFF}", uid=int(name), version=version, connections=conns)


def test_topology_round_trip() -> None:
    records = (
        peer(A, 3, (wire.ConnectionSummary(B, "10.0.0.2:6783", True, True),)),
        peer(B, 1, (wire.ConnectionSummary(A, "[fe80::1]:40000", False, False),)),
    )
    assert wire.decode_topology(wire.encode_topology(records)) == records


@pytest.mark.parametrize(
    ("records", "complaint"),
    [
        ({"not": "a list"}, "not a list"),
        ([[int(A), "a", 1, 1]], "5-element"),
        ([[int(A), "a", 1, 1, []], [int(A), "a", 1, 1, []]], "twice"),
        ([[int(A), "a", 0, 1, []]], "uid 0"),
        ([[int(A), "a", 1, 0, []]], "version 0"),
        ([[int(A), "a", 1, (1 << 62) + 1, []]], "topology version"),
        ([[int(A), "a", 1, 1, [[int(B), "10.0.0.1:0", True, True]]]], "ip:port"),
        ([[int(A), "a", 1, 1, [[int(A), "10.0.0.1:6783", True, True]]]], "self or duplicate"),
        ([[int(A), "a", 1, 1, [[int(B), "host.example:6783", True, True]]]], "IP address"),
        ([[int(A), "a", 1, 1, [[int(B), "10.0.0.1", True, True]]]], "ip:port"),
        ([[int(A), "a", 1, 1, [[int(B), "10.0.0.1:99999", True, True]]]], "ip:port"),
        ([[int(A), "a", 1, 1, [[int(B), "10.0.0.1:1", 1, True]]]], "outbound"),
    ],
)
def test_bad_topology_updates(records: object, complaint: str) -> None:
    with pytest.raises(wire.ProtocolError, match=complaint):
        wire.decode_topology(msgpack.packb(records))


def test_channel_names() -> None:
    assert wire.valid_channel_name("IPallocation")
    assert not wire.valid_channel_name("has space")
    assert not wire.valid_channel_name("x" * 65)
