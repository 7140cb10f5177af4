"""The mesh's message schema: every byte a peer sends us after the handshake is decoded here.

Each message on an established control connection is one tag byte followed by a msgpack array
whose fields have fixed positions. Decoding validates every field's type and range into a frozen
dataclass *before* anything touches router state; anything else (unknown tag, garbage, truncated
or oversized input, a wrong type, an out-of-range value) raises `ProtocolError`, which closes that
one connection. The same goes for the intro exchanged inside the handshake and for the topology
gossip payload.

This module is pure: no I/O, no logging, no state. It must never trust a length or a count it has
not checked against the limits below.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from weavenet.mesh.peer_name import PeerName

# Limits. A framed message is at most MAX_MESSAGE bytes (the handshake's framing enforces it too);
# the rest bound what one message may make us allocate or iterate.
MAX_MESSAGE = 10 * 1024 * 1024
MAX_GOSSIP_PAYLOAD = MAX_MESSAGE - 4096  # room for the envelope around the payload
MAX_CHANNEL_NAME = 64
MAX_NICKNAME = 255
MAX_ADDRESS = 64
MAX_PEERS_PER_UPDATE = 16384
MAX_CONNECTIONS_PER_PEER = 4096
MAX_OVERLAYS = 16
MAX_UINT64 = (1 << 64) - 1
MAX_VERSION = 1 << 62  # versions grow by one per event; far above any real one, and +1 always fits u64
MAX_PEER_NAME = (1 << 48) - 1

INTRO_VERSION = 1


class ProtocolError(Exception):
    """A peer sent something that is not a valid mesh message. `str()` says what, in one line."""


class Tag(IntEnum):
    """The first byte of every message after the handshake (numbering follows Weave Net's)."""

    HEARTBEAT = 0
    GOSSIP = 4
    GOSSIP_UNICAST = 5
    GOSSIP_BROADCAST = 6
    OVERLAY_CONTROL = 7


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Keeps the peer's read deadline from firing; carries nothing."""


@dataclass(frozen=True, slots=True)
class Gossip:
    """Neighbour gossip: `sender` is the immediate neighbour that sent it."""

    channel: str
    sender: PeerName
    payload: bytes


@dataclass(frozen=True, slots=True)
class GossipUnicast:
    """Point-to-point gossip, relayed hop by hop along `unicast_all` routes towards `dst`."""

    channel: str
    src: PeerName
    dst: PeerName
    payload: bytes


@dataclass(frozen=True, slots=True)
class GossipBroadcast:
    """Gossip relayed along `src`'s broadcast tree."""

    channel: str
    src: PeerName
    payload: bytes


@dataclass(frozen=True, slots=True)
class OverlayControl:
    """Datapath establishment traffic between the two ends of one connection (opaque to the mesh)."""

    subtag: int
    payload: bytes


Message = Heartbeat | Gossip | GossipUnicast | GossipBroadcast | OverlayControl


def encode_message(message: Message) -> bytes:
    """The wire bytes of one message (the caller frames and, with a password, encrypts them)."""
    match message:
        case Heartbeat():
            return bytes([Tag.HEARTBEAT])
        case Gossip(channel, sender, payload):
            return _pack(Tag.GOSSIP, [channel, int(sender), payload])
        case GossipUnicast(channel, src, dst, payload):
            return _pack(Tag.GOSSIP_UNICAST, [channel, int(src), int(dst), payload])
        case GossipBroadcast(channel, src, payload):
            return _pack(Tag.GOSSIP_BROADCAST, [channel, int(src), payload])
        case OverlayControl(subtag, payload):
            return _pack(Tag.OVERLAY_CONTROL, [subtag, payload])
    raise TypeError(f"not a mesh message: {message!r}")


def decode_message(data: bytes) -> Message:
    """Parse and validate one message; raises ProtocolError for anything that is not one."""
    if not data:
        raise ProtocolError("empty message")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    try:
        tag = Tag(data[0])
    except ValueError:
        raise ProtocolError(f"unknown message tag {data[0]}") from None
    if tag is Tag.HEARTBEAT:
        if len(data) != 1:
            raise ProtocolError("heartbeat with a body")
        return Heartbeat()
    fields = _unpack_array(data[1:], tag.name.lower())
    if tag is Tag.GOSSIP:
        _expect_len(fields, 3, "gossip")
        return Gossip(
            _channel(fields[0]), _peer_name(fields[1], "gossip sender"), _payload(fields[2], "gossip payload")
        )
    if tag is Tag.GOSSIP_UNICAST:
        _expect_len(fields, 4, "gossip unicast")
        return GossipUnicast(
            _channel(fields[0]),
            _peer_name(fields[1], "unicast source"),
            _peer_name(fields[2], "unicast destination"),
            _payload(fields[3], "unicast payload"),
        )
    if tag is Tag.GOSSIP_BROADCAST:
        _expect_len(fields, 3, "gossip broadcast")
        return GossipBroadcast(
            _channel(fields[0]), _peer_name(fields[1], "broadcast source"), _payload(fields[2], "broadcast payload")
        )
    _expect_len(fields, 2, "overlay control")
    return OverlayControl(_uint(fields[0], "overlay control subtag", 255), _payload(fields[1], "overlay payload"))


# --------------------------------------------------------------------------------------------
# Intro: who we are, carried inside the handshake (encrypted when there is a password)


@dataclass(frozen=True, slots=True)
class Intro:
    """What each end tells the other once the handshake has agreed a channel."""

    name: PeerName
    nickname: str
    uid: int  # random per process start, non-zero: tells restarts apart
    conn_id: int  # random per connection; conn uid = ours XOR theirs
    trusted: bool  # whether the *sender* trusts the receiver's address (--trusted-subnets)
    overlays: tuple[str, ...] = ()  # datapaths the sender can run, most preferred first
    data_port: int = 0  # the sender's datapath UDP port; 0 = it runs no datapath
    kernel_port: int = 0  # the sender's kernel fast path (VXLAN) UDP port; 0 = it offers none


def encode_intro(intro: Intro) -> bytes:
    return msgpack.packb(
        {
            "v": INTRO_VERSION,
            "name": int(intro.name),
            "nick": intro.nickname,
            "uid": intro.uid,
            "conn_id": intro.conn_id,
            "trusted": intro.trusted,
            "overlays": list(intro.overlays),
            "data_port": intro.data_port,
            "kernel_port": intro.kernel_port,
        },
        use_bin_type=True,
    )


def decode_intro(data: bytes) -> Intro:
    """Validate a peer's intro. Unknown keys are ignored so later versions can add fields."""
    if len(data) > 4096:
        raise ProtocolError(f"intro of {len(data)} bytes is too large")
    fields = _unpack(data, "intro")
    if not isinstance(fields, dict):
        raise ProtocolError("intro is not a map")
    version = fields.get("v")
    if type(version) is not int or version < 1:
        raise ProtocolError(f"intro has no valid version (got {version!r})")
    for key in ("name", "nick", "uid", "conn_id", "trusted"):
        if key not in fields:
            raise ProtocolError(f"intro lacks required field {key!r}")
    uid = _uint(fields["uid"], "intro uid", MAX_UINT64)
    if uid == 0:
        raise ProtocolError("intro uid must not be zero")
    overlays = fields.get("overlays", [])
    if not isinstance(overlays, list) or len(overlays) > MAX_OVERLAYS:
        raise ProtocolError("intro overlays must be a short list")
    return Intro(
        name=_peer_name(fields["name"], "intro name"),
        nickname=_nickname(fields["nick"]),
        uid=uid,
        conn_id=_uint(fields["conn_id"], "intro conn_id", MAX_UINT64),
        trusted=_bool(fields["trusted"], "intro trusted"),
        overlays=tuple(_short_text(o, "overlay name", 32) for o in overlays),
        data_port=_uint(fields.get("data_port", 0), "intro data_port", 65535),
        kernel_port=_uint(fields.get("kernel_port", 0), "intro kernel_port", 65535),
    )


# --------------------------------------------------------------------------------------------
# Topology gossip payload: peer records with their connection lists


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """One end's view of a connection: the remote peer and the remote's TCP address as seen here."""

    peer: PeerName
    address: str  # "ip:port"
    outbound: bool
    established: bool


@dataclass(frozen=True, slots=True)
class PeerSummary:
    """A peer's own record, as gossiped. `version` is owned (and only ever bumped) by that peer."""

    name: PeerName
    nickname: str
    uid: int
    version: int
    connections: tuple[ConnectionSummary, ...]


def encode_topology(peers: Sequence[PeerSummary]) -> bytes:
    return msgpack.packb(
        [
            [
                int(p.name),
                p.nickname,
                p.uid,
                p.version,
                [[int(c.peer), c.address, c.outbound, c.established] for c in p.connections],
            ]
            for p in peers
        ],
        use_bin_type=True,
    )


def decode_topology(
    data: bytes, outdated: Callable[[PeerName, int, int], bool] | None = None
) -> tuple[PeerSummary, ...]:
    """Validate a topology update: every record complete, no duplicates, no self-links.

    Records whose header (name, uid, version) `outdated` says we would discard are left out
    without reading their connection lists: in a full mesh most gossip repeats what we hold, and
    validating n² connection entries per message was the cost of convergence.
    """
    records = _unpack(data, "topology update")
    if not isinstance(records, list):
        raise ProtocolError("topology update is not a list")
    if len(records) > MAX_PEERS_PER_UPDATE:
        raise ProtocolError(f"topology update names {len(records)} peers (limit {MAX_PEERS_PER_UPDATE})")
    result: list[PeerSummary] = []
    seen: set[int] = set()
    for record in records:
        if not isinstance(record, list) or len(record) != 5:
            raise ProtocolError("topology record is not a 5-element list")
        name = _peer_name(record[0], "topology peer name")
        if name in seen:
            raise ProtocolError(f"topology update names peer {name} twice")
        seen.add(name)
        uid = _uint(record[2], "topology uid", MAX_UINT64)
        if uid == 0:
            raise ProtocolError(f"topology record for {name} has uid 0")
        version = _uint(record[3], "topology version", MAX_VERSION)
        if version == 0:
            raise ProtocolError(f"topology record for {name} has version 0")
        connections = record[4]
        if not isinstance(connections, list) or len(connections) > MAX_CONNECTIONS_PER_PEER:
            raise ProtocolError(f"topology record for {name} has an invalid connection list")
        if outdated is not None and outdated(name, uid, version):
            continue
        summaries: list[ConnectionSummary] = []
        linked: set[int] = set()
        for conn in connections:
            if not isinstance(conn, list) or len(conn) != 4:
                raise ProtocolError(f"connection of {name} is not a 4-element list")
            remote = _peer_name(conn[0], "connection peer")
            if remote == name or remote in linked:
                raise ProtocolError(f"topology record for {name} has a self or duplicate link to {remote}")
            linked.add(remote)
            summaries.append(
                ConnectionSummary(
                    remote,
                    _address(conn[1]),
                    _bool(conn[2], "connection outbound"),
                    _bool(conn[3], "connection established"),
                )
            )
        result.append(
            PeerSummary(
                name=name,
                nickname=_nickname(record[1]),
                uid=uid,
                version=version,
                connections=tuple(summaries),
            )
        )
    return tuple(result)


# --------------------------------------------------------------------------------------------
# Field validators


def _pack(tag: Tag, fields: list[Any]) -> bytes:
    return bytes([tag]) + msgpack.packb(fields, use_bin_type=True)


def _unpack(data: bytes, what: str) -> Any:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{what} of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE,
            max_bin_len=MAX_MESSAGE,
            max_array_len=max(MAX_PEERS_PER_UPDATE, MAX_CONNECTIONS_PER_PEER),
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise ProtocolError(f"{what} has trailing bytes") from None
    except (ValueError, msgpack.UnpackException, RecursionError) as exc:
        # FormatError, StackError, OutOfData, BufferFull and UnicodeDecodeError all land here.
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None


def _unpack_array(data: bytes, what: str) -> list[Any]:
    fields = _unpack(data, what)
    if not isinstance(fields, list):
        raise ProtocolError(f"{what} body is not an array")
    return fields


def _expect_len(fields: list[Any], n: int, what: str) -> None:
    if len(fields) != n:
        raise ProtocolError(f"{what} has {len(fields)} fields, expected {n}")


def _uint(value: Any, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise ProtocolError(f"{what} must be an integer in 0..{maximum}")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} must be a boolean")
    return value


def _peer_name(value: Any, what: str) -> PeerName:
    if type(value) is not int or not 0 < value <= MAX_PEER_NAME:
        raise ProtocolError(f"{what} must be a non-zero 48-bit peer name")
    return PeerName(value)


def _payload(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"{what} must be binary")
    if len(value) > MAX_GOSSIP_PAYLOAD:
        raise ProtocolError(f"{what} of {len(value)} bytes exceeds the limit")
    return value


def _short_text(value: Any, what: str, limit: int) -> str:
    if type(value) is not str or len(value) > limit or not value.isprintable():
        raise ProtocolError(f"{what} must be printable text of at most {limit} characters")
    return value


def _channel(value: Any) -> str:
    text = _short_text(value, "channel name", MAX_CHANNEL_NAME)
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in text):
        raise ProtocolError("channel name must be 1-64 characters of [A-Za-z0-9._-]")
    return text


def _nickname(value: Any) -> str:
    return _short_text(value, "nickname", MAX_NICKNAME)


def _address(value: Any) -> str:
    """An "ip:port" (IPv6 as "[ip]:port"); an IP literal, never a name, so gossip cannot make us resolve."""
    return _checked_address(_short_text(value, "connection address", MAX_ADDRESS))


@functools.lru_cache(maxsize=8192)
def _checked_address(text: str) -> str:
    # Every topology message repeats every peer's connection addresses (n² of them in a full
    # mesh): validating each string once instead of each time keeps decoding linear in new data.
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ProtocolError(f"connection address {text!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(f"connection address {text!r} does not start with an IP address") from None
    return text


def valid_channel_name(name: str) -> bool:
    """Whether `name` may be used as a gossip channel (the same rule decoding applies)."""
    try:
        _channel(name)
    except ProtocolError:
        return False
    return True
