"""The IPAM gossip channel's messages: encoding, and decoding that validates everything first.

Two shapes travel on the channel (named "ipam"):
  - a **state**: who sent it, the allocation range, and either the ring (once it exists) or the
    sender's view of the Paxos run (before), plus the seed list and nicknames; it is what
    periodic gossip, broadcasts and the RingUpdate unicast carry;
  - a **unicast**: a one-byte tag then a body: SpaceRequest(range), RingUpdate(state, reply?),
    SpaceDenied(range).
Bodies are msgpack arrays, size-capped before unpacking, with every field type- and range-checked;
rings are decoded by `Ring.from_bytes`, which validates the ring's own invariants. Nothing here
touches allocator state: a payload is either a fully valid value or a `WireError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from weavenet._fastdp import Ring, RingDecodeError
from weavenet.ipam.consensus import Claims, ProposalId

CHANNEL = "ipam"
FORMAT = 1
MAX_PAYLOAD = 4 * 1024 * 1024  # a ring of ~150k entries; anything bigger is refused unread
MAX_NODES = 1024  # Paxos participants, seeds, nicknames
MAX_NICKNAME = 64
MAX_CLOCK = (1 << 53) - 1
MAX_PEER_NAME = (1 << 48) - 1
ADDRESS_END = 1 << 32


class WireError(Exception):
    """A payload that is not a valid IPAM message; one line, names the first thing wrong."""


class Tag(enum.IntEnum):
    SPACE_REQUEST = 0
    RING_UPDATE = 1
    SPACE_DENIED = 2


@dataclass
class State:
    """One peer's IPAM state as gossiped. `ring` is decoded (and valid) or None."""

    sender: int
    start: int
    end: int
    ring: Ring | None = None
    paxos: dict[int, Claims] | None = None
    seeds: tuple[int, ...] = ()
    nicknames: dict[int, str] = field(default_factory=dict)
    want_ring: bool = False  # an observer (or a restarted peer) asking electors for the ring


@dataclass(frozen=True)
class SpaceRequest:
    start: int
    end: int


@dataclass(frozen=True)
class SpaceDenied:
    start: int
    end: int


@dataclass(frozen=True)
class RingUpdate:
    state: State
    want_reply: bool = False  # "send me your ring back" (used to confirm a reset or an rmpeer)


Unicast = SpaceRequest | SpaceDenied | RingUpdate


# --------------------------------------------------------------------------------------------
# Encoding


def _claims_fields(node: int, claims: Claims) -> list[Any]:
    return [
        node,
        claims.promise.round,
        claims.promise.proposer,
        claims.accepted.round,
        claims.accepted.proposer,
        list(claims.value),
    ]


def _state_fields(state: State) -> list[Any]:
    return [
        FORMAT,
        state.sender,
        state.start,
        state.end,
        state.ring.to_bytes() if state.ring is not None and not state.ring.is_empty() else None,
        None if state.paxos is None else [_claims_fields(n, c) for n, c in sorted(state.paxos.items())],
        list(state.seeds),
        {int(k): v for k, v in sorted(state.nicknames.items())},
        state.want_ring,
    ]


def encode_state(state: State) -> bytes:
    return msgpack.packb(_state_fields(state), use_bin_type=True)


def encode_unicast(message: Unicast) -> bytes:
    match message:
        case SpaceRequest(start, end):
            body: list[Any] = [start, end]
            tag = Tag.SPACE_REQUEST
        case SpaceDenied(start, end):
            body = [start, end]
            tag = Tag.SPACE_DENIED
        case RingUpdate(state, want_reply):
            body = [_state_fields(state), want_reply]
            tag = Tag.RING_UPDATE
    return bytes([tag]) + msgpack.packb(body, use_bin_type=True)


# --------------------------------------------------------------------------------------------
# Decoding


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_PAYLOAD:
        raise WireError(f"message of {len(data)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_str_len=MAX_PAYLOAD,
            max_bin_len=MAX_PAYLOAD,
            max_array_len=MAX_NODES,
            max_map_len=MAX_NODES,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise WireError("trailing bytes after the message") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise WireError(f"not valid msgpack ({type(exc).__name__})") from None


def _array(value: Any, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what} is not an array")
    if length is not None and len(value) != length:
        raise WireError(f"{what} has {len(value)} fields, expected {length}")
    return value


def _uint(value: Any, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise WireError(f"{what} must be an integer in 0..{maximum}")
    return value


def _peer(value: Any, what: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_PEER_NAME:
        raise WireError(f"{what} must be a non-zero 48-bit peer name")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{what} must be a boolean")
    return value


def _range(start: Any, end: Any, what: str) -> tuple[int, int]:
    s = _uint(start, f"{what} start", ADDRESS_END - 1)
    e = _uint(end, f"{what} end", ADDRESS_END)
    if s >= e:
        raise WireError(f"{what} is empty or reversed")
    return s, e


def _proposal(round_: Any, proposer: Any, what: str) -> ProposalId:
    r = _uint(round_, f"{what} round", MAX_CLOCK)
    if r == 0:
        if proposer != 0:
            raise WireError(f"{what} has no round but names a proposer")
        return ProposalId()
    return ProposalId(r, _peer(proposer, f"{what} proposer"))


def _paxos(value: Any) -> dict[int, Claims]:
    out: dict[int, Claims] = {}
    for item in _array(value, "paxos state"):
        node, p_round, p_node, a_round, a_node, raw_value = _array(item, "paxos claims", 6)
        name = _peer(node, "paxos node")
        if name in out:
            raise WireError("paxos state names a node twice")
        accepted = _proposal(a_round, a_node, "accepted proposal")
        values = tuple(_peer(v, "paxos value") for v in _array(raw_value, "paxos value"))
        if accepted.round == 0 and values:
            raise WireError("paxos claims carry a value without an accepted proposal")
        if accepted.round > 0 and not values:
            raise WireError("paxos claims accept an empty value")
        out[name] = Claims(_proposal(p_round, p_node, "promise"), accepted, values)
    return out


def _nicknames(value: Any) -> dict[int, str]:
    if not isinstance(value, dict):
        raise WireError("nicknames is not a map")
    out = {}
    for key, nick in value.items():
        if type(nick) is not str or not 0 < len(nick) <= MAX_NICKNAME or not nick.isprintable():
            raise WireError(f"nickname must be 1-{MAX_NICKNAME} printable characters")
        out[_peer(key, "nickname's peer")] = nick
    return out


def _state(fields: Any) -> State:
    version, sender, start, end, ring_bytes, paxos, seeds, nicknames, want_ring = _array(fields, "state", 9)
    if version != FORMAT:
        raise WireError(f"unsupported IPAM message format {version!r} (we speak {FORMAT})")
    state = State(sender=_peer(sender, "sender"), start=0, end=0)
    state.start, state.end = _range(start, end, "allocation range")
    if ring_bytes is not None:
        if type(ring_bytes) is not bytes:
            raise WireError("ring must be binary")
        try:
            ring = Ring.from_bytes(ring_bytes)
        except RingDecodeError as exc:
            raise WireError(str(exc)) from None
        if (ring.start, ring.end) != (state.start, state.end):
            raise WireError("the ring's range differs from the message's")
        if ring.peer != state.sender:
            raise WireError("the ring was encoded by another peer than the sender")
        if ring.is_empty():
            raise WireError("an empty ring is sent as none")
        state.ring = ring
    state.paxos = None if paxos is None else _paxos(paxos)
    state.seeds = tuple(_peer(s, "seed") for s in _array(seeds, "seeds"))
    state.nicknames = _nicknames(nicknames)
    state.want_ring = _bool(want_ring, "want_ring")
    return state


def decode_state(payload: bytes) -> State:
    """A gossip or broadcast payload. Raises WireError."""
    return _state(_unpack(payload))


def decode_unicast(payload: bytes) -> Unicast:
    """A unicast payload (tag byte + body). Raises WireError."""
    if not payload:
        raise WireError("empty unicast")
    try:
        tag = Tag(payload[0])
    except ValueError:
        raise WireError(f"unknown unicast tag {payload[0]}") from None
    body = _unpack(payload[1:])
    if tag is Tag.RING_UPDATE:
        fields, want_reply = _array(body, "ring update", 2)
        return RingUpdate(_state(fields), _bool(want_reply, "want_reply"))
    start, end = _array(body, "space request" if tag is Tag.SPACE_REQUEST else "space denied", 2)
    s, e = _range(start, end, "requested range")
    return SpaceRequest(s, e) if tag is Tag.SPACE_REQUEST else SpaceDenied(s, e)
