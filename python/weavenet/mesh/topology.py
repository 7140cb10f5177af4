"""The mesh's view of who exists and who is connected to whom (Weave Net's `Peers`).

Each peer owns its own record (name, nickname, uid, version, connection list) and is the only one
who bumps its version. Records arrive by gossip and merge by a fixed rule, so every router that
has seen the same records holds the same topology whatever the order they arrived in:
  - a higher version wins; at equal versions the higher uid wins (a restarted peer);
  - peers named only inside connection lists (or met in a handshake) are placeholders (version 0)
    until their own record arrives; any real record (version >= 1) replaces a placeholder;
  - a record about *ourselves* from another incarnation makes us bump our version past it, so our
    current record wins everywhere once we re-announce it.
Unreachable peers with no local connection are garbage-collected.

Pure: no I/O, no clocks, no logging. Inputs are already-validated `wire` records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.wire import MAX_VERSION, ConnectionSummary, PeerSummary

__all__ = ["ConnectionSummary", "MergeResult", "PeerSummary", "Topology", "reachable"]


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What an update did: `names` it carried (for broadcast relaying) and what it `changed` (to gossip on)."""

    names: frozenset[PeerName]
    changed: frozenset[PeerName]
    new_peers: frozenset[PeerName]  # names we had no real record for before (new or placeholder)
    restarted: frozenset[PeerName]  # known peers whose uid changed (a new incarnation)


def _next(version: int) -> int:
    """The version after `version`, held at the wire's ceiling (reachable only by a hostile record)."""
    return min(version + 1, MAX_VERSION)


def placeholder(name: PeerName, nickname: str = "", uid: int = 0) -> PeerSummary:
    """A peer we know of (someone is connected to it, or it just connected to us) but hold no record for."""
    return PeerSummary(name=name, nickname=nickname, uid=uid, version=0, connections=())


def is_placeholder(record: PeerSummary) -> bool:
    return record.version == 0


class Topology:
    """All peers we know, keyed by name; our own record is always present and always ours."""

    def __init__(self, name: PeerName, nickname: str, uid: int) -> None:
        if uid == 0:
            raise ValueError("a peer uid must be non-zero")
        self.local_name = name
        self._peers: dict[PeerName, PeerSummary] = {
            name: PeerSummary(name=name, nickname=nickname, uid=uid, version=1, connections=())
        }

    # -- reading -----------------------------------------------------------------------------

    @property
    def local(self) -> PeerSummary:
        return self._peers[self.local_name]

    @property
    def peers(self) -> Mapping[PeerName, PeerSummary]:
        """Every peer record, placeholders included (read-only view; do not hold across awaits)."""
        return self._peers

    def get(self, name: PeerName) -> PeerSummary | None:
        return self._peers.get(name)

    def known(self, name: PeerName) -> bool:
        """Whether we hold a real (non-placeholder) record for `name`."""
        record = self._peers.get(name)
        return record is not None and not is_placeholder(record)

    def records(self, names: Iterable[PeerName] | None = None) -> list[PeerSummary]:
        """Records to gossip: the named ones (or all), placeholders left out, sorted by name."""
        selected = self._peers.keys() if names is None else names
        out = [r for n in selected if (r := self._peers.get(n)) is not None and not is_placeholder(r)]
        return sorted(out, key=lambda r: r.name)

    # -- our own record ----------------------------------------------------------------------

    def set_local_connections(self, connections: Iterable[ConnectionSummary]) -> bool:
        """Replace our connection list; bumps our version if anything differs. Returns whether it did."""
        conns = tuple(sorted(connections, key=lambda c: c.peer))
        local = self.local
        if conns == local.connections:
            return False
        self._peers[self.local_name] = replace(local, version=_next(local.version), connections=conns)
        for conn in conns:
            self._peers.setdefault(conn.peer, placeholder(conn.peer))
        return True

    def note_peer(self, name: PeerName, nickname: str, uid: int) -> None:
        """Remember a peer met in a handshake until its own record arrives (never overrides a record)."""
        record = self._peers.get(name)
        if name != self.local_name and (record is None or is_placeholder(record)):
            self._peers[name] = placeholder(name, nickname, uid)

    def set_local_nickname(self, nickname: str) -> None:
        local = self.local
        if nickname != local.nickname:
            self._peers[self.local_name] = replace(local, nickname=nickname, version=_next(local.version))

    # -- merging -----------------------------------------------------------------------------

    def merge(self, update: Iterable[PeerSummary]) -> MergeResult:
        """Apply gossiped records; see the module docstring for the rules."""
        names: set[PeerName] = set()
        changed: set[PeerName] = set()
        new_peers: set[PeerName] = set()
        restarted: set[PeerName] = set()
        applied: list[PeerSummary] = []
        for record in update:
            names.add(record.name)
            if record.name == self.local_name:
                if self._stale_self(record):
                    local = self.local
                    self._peers[self.local_name] = replace(local, version=_next(record.version))
                    changed.add(self.local_name)
                continue
            if self.outdated(record.name, record.uid, record.version):
                continue
            existing = self._peers.get(record.name)
            if existing is None or is_placeholder(existing):
                new_peers.add(record.name)
            elif existing.uid != record.uid:
                restarted.add(record.name)
            self._peers[record.name] = record
            changed.add(record.name)
            applied.append(record)
        for record in applied:
            for conn in record.connections:
                self._peers.setdefault(conn.peer, placeholder(conn.peer))
        return MergeResult(frozenset(names), frozenset(changed), frozenset(new_peers), frozenset(restarted))

    def outdated(self, name: PeerName, uid: int, version: int) -> bool:
        """Whether a gossiped record with this header loses to the one we hold (never for ours:
        a stale record of ourselves must still be outbid)."""
        if name == self.local_name:
            return False
        existing = self._peers.get(name)
        return existing is not None and (version, uid) <= (existing.version, existing.uid)

    def _stale_self(self, record: PeerSummary) -> bool:
        """A record under our name that is not our current one and could beat it: outbid it."""
        local = self.local
        if record.uid == local.uid and record.version <= local.version:
            return False  # an old copy of our own record: harmless
        return record.version >= local.version

    # -- garbage collection ------------------------------------------------------------------

    def gc(self, referenced: Set[PeerName] = frozenset()) -> list[PeerSummary]:
        """Remove peers unreachable from us over any connections and not `referenced` locally."""
        reached = reachable(self.local_name, self._peers)
        removed = [
            record
            for name, record in self._peers.items()
            if name not in reached and name not in referenced and name != self.local_name
        ]
        for record in removed:
            del self._peers[record.name]
        return removed


def reachable(start: PeerName, peers: Mapping[PeerName, PeerSummary]) -> set[PeerName]:
    """Names reachable from `start` following every listed connection (established or not)."""
    seen = {start}
    frontier = [start]
    while frontier:
        nxt: list[PeerName] = []
        for name in frontier:
            record = peers.get(name)
            if record is None:
                continue
            for conn in record.connections:
                if conn.peer not in seen:
                    seen.add(conn.peer)
                    nxt.append(conn.peer)
        frontier = nxt
    return seen
