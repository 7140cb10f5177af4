"""Which MACs live behind which peer, as the peers themselves say: the kernel path's forwarding table.

Frames on the kernel path bypass the Rust datapath, so nothing learns from them; and the VXLAN port
learns nothing by design (a forged datagram must not redirect anyone's traffic). Instead each router
tells its direct neighbours the unicast MACs on its own bridge (overlay control messages over the
encrypted-or-not TCP connection): the whole set when a connection starts, changes after. A MAC that
leaves a host (its veth goes, it ages out) is withdrawn at once, which is how a MAC that moves to
another host is followed. A MAC claimed by two peers goes to the most recent claim; a MAC on our own
bridge is never sent away. Everything received is validated and bounded before it touches state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack

SUBTAG = 1  # overlay control subtag of MAC announcements
VERSION = 1
MAX_PER_MESSAGE = 4096
MAX_PER_PEER = 16384


class AnnouncementError(ValueError):
    """A payload that is not a valid announcement; the message says what was wrong."""


@dataclass(frozen=True)
class Announcement:
    full: bool  # the sender's whole set starts here: forget what it said before
    added: frozenset[str]
    removed: frozenset[str] = frozenset()


def _raw(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _text(raw: object) -> str:
    if not isinstance(raw, bytes) or len(raw) != 6:
        raise AnnouncementError("a MAC must be 6 bytes")
    if raw[0] & 1:
        raise AnnouncementError(f"{raw.hex(':')} is not a unicast MAC")
    return raw.hex(":")


def encode(announcement: Announcement) -> bytes:
    return msgpack.packb(
        {
            "v": VERSION,
            "full": announcement.full,
            "add": [_raw(m) for m in sorted(announcement.added)],
            "del": [_raw(m) for m in sorted(announcement.removed)],
        },
        use_bin_type=True,
    )


def decode(payload: bytes) -> Announcement:
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=8, max_array_len=MAX_PER_MESSAGE)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise AnnouncementError(f"undecodable announcement: {exc}") from None
    if not isinstance(fields, dict) or fields.get("v") != VERSION:
        raise AnnouncementError(f"not a version {VERSION} announcement")
    full, added, removed = fields.get("full"), fields.get("add", []), fields.get("del", [])
    if not isinstance(full, bool) or not isinstance(added, list) or not isinstance(removed, list):
        raise AnnouncementError("announcement fields have the wrong types")
    if len(added) + len(removed) > MAX_PER_MESSAGE:
        raise AnnouncementError(f"more than {MAX_PER_MESSAGE} MACs in one announcement")
    return Announcement(full, frozenset(map(_text, added)), frozenset(map(_text, removed)))


def announcements(full: bool, added: Iterable[str], removed: Iterable[str] = ()) -> Iterator[Announcement]:
    """One change (or a whole set) as messages of at most MAX_PER_MESSAGE MACs each."""
    items = [(m, True) for m in sorted(added)] + [(m, False) for m in sorted(removed)]
    first = True
    for start in range(0, max(len(items), 1), MAX_PER_MESSAGE):
        chunk = items[start : start + MAX_PER_MESSAGE]
        yield Announcement(
            full and first,
            frozenset(m for m, add in chunk if add),
            frozenset(m for m, add in chunk if not add),
        )
        first = False


class PeerMacs:
    """Every neighbour's announced MACs, with the order claims arrived in (for conflicts)."""

    def __init__(self) -> None:
        self._claims: dict[int, dict[str, int]] = {}  # peer → MAC → claim number
        self._counter = 0

    def apply(self, peer: int, announcement: Announcement) -> None:
        """Take one announcement from `peer`. AnnouncementError (state unchanged) if it would
        give the peer more than MAX_PER_PEER MACs."""
        claims = {} if announcement.full else dict(self._claims.get(peer, {}))
        for mac in announcement.removed:
            claims.pop(mac, None)
        for mac in sorted(announcement.added - claims.keys()):
            self._counter += 1
            claims[mac] = self._counter
        if len(claims) > MAX_PER_PEER:
            raise AnnouncementError(f"peer would announce more than {MAX_PER_PEER} MACs")
        self._claims[peer] = claims

    def drop(self, peer: int) -> None:
        self._claims.pop(peer, None)

    def of(self, peer: int) -> frozenset[str]:
        return frozenset(self._claims.get(peer, {}))

    def owners(self, peers: set[int], local: set[str]) -> dict[str, int]:
        """MAC → its owner, for the MACs whose newest claim is by one of `peers` (the others stay
        with whoever claims them newest, even a peer not among `peers`); our own MACs left out."""
        best: dict[str, tuple[int, int]] = {}
        for peer, claims in self._claims.items():
            for mac, order in claims.items():
                if mac not in local and (mac not in best or order > best[mac][0]):
                    best[mac] = (order, peer)
        return {mac: peer for mac, (_, peer) in best.items() if peer in peers}
