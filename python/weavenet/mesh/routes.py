"""Route tables computed from the topology: unicast next hops and per-source broadcast fan-out.

The computation is a breadth-first search whose levels are sorted by peer name, so every router
computes the same trees from the same topology (Weave Net's `routes()`):
  - `unicast[X]`: the neighbour through which X was first reached, over links that are
    *established and symmetric* (both ends list each other as established) — the datapath's routes;
  - `unicast_all[X]`: the same over every listed link — what gossip uses;
  - `broadcast(S)` / `broadcast_all(S)`: run S's search until it reaches us; our neighbours not yet
    reached at that point are our next hops for S's broadcasts, which delivers each broadcast to
    every peer exactly once when views agree.

Pure: no I/O, no clocks. A `Routes` value is immutable once built (broadcast entries are computed
on first use and cached inside it), so readers can hold one snapshot for as long as they like.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.wire import PeerSummary

UNKNOWN_PEER = "00:00:00:00:00:00"


Adjacency = Mapping[PeerName, tuple[PeerName, ...]]


def adjacency(peers: Mapping[PeerName, PeerSummary], symmetric: bool) -> dict[PeerName, tuple[PeerName, ...]]:
    """Each peer's neighbours: every listed link, or only established links the other end confirms.

    Built once per topology snapshot (a set lookup per link) rather than per BFS step, which made
    route computation cubic in a full mesh.
    """
    if not symmetric:
        return {name: tuple(c.peer for c in record.connections) for name, record in peers.items()}
    established = {(name, c.peer) for name, record in peers.items() for c in record.connections if c.established}
    return {
        name: tuple(c.peer for c in record.connections if c.established and (c.peer, name) in established)
        for name, record in peers.items()
    }


def _search(
    links: Adjacency, start: PeerName, stop_at: PeerName | None = None
) -> tuple[bool, dict[PeerName, PeerName | None]]:
    """BFS from `start`; returns (stopped at `stop_at`, first hop towards each reached peer)."""
    routes: dict[PeerName, PeerName | None] = {start: None}
    worklist = [start]
    while worklist:
        worklist.sort()
        nxt: list[PeerName] = []
        for current in worklist:
            if current == stop_at:
                return True, routes
            for remote in links.get(current, ()):
                if remote in routes:
                    continue
                routes[remote] = remote if current == start else routes[current]
                nxt.append(remote)
        worklist = nxt
    return False, routes


@dataclass(frozen=True)
class Routes:
    """One consistent snapshot of the route tables for peer `local`."""

    local: PeerName
    unicast: Mapping[PeerName, PeerName]
    unicast_all: Mapping[PeerName, PeerName]
    _links: Mapping[bool, Adjacency] = field(repr=False, compare=False)  # symmetric? → adjacency
    _broadcast: dict[tuple[PeerName, bool], tuple[PeerName, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def empty(cls, local: PeerName) -> Routes:
        return cls(local, {}, {}, {True: {}, False: {}})

    def broadcast(self, source: PeerName) -> tuple[PeerName, ...]:
        """Next hops for a broadcast from `source`, over established symmetric links (datapath)."""
        return self._fan_out(source, True)

    def broadcast_all(self, source: PeerName) -> tuple[PeerName, ...]:
        """Next hops for a gossip broadcast from `source`, over every link."""
        return self._fan_out(source, False)

    def _fan_out(self, source: PeerName, symmetric: bool) -> tuple[PeerName, ...]:
        key = (source, symmetric)
        cached = self._broadcast.get(key)
        if cached is not None:
            return cached
        hops: tuple[PeerName, ...] = ()
        links = self._links[symmetric]
        if source in links:
            found, reached = _search(links, source, stop_at=self.local)
            if found:
                hops = tuple(sorted(n for n in links.get(self.local, ()) if n not in reached))
        self._broadcast[key] = hops
        return hops

    def random_neighbours(self, exclude: PeerName | None = None, rng: random.Random | None = None) -> list[PeerName]:
        """A few distinct neighbours for neighbour gossip (Weave Net's `randomNeighbours`).

        k = min(2·log2(peers reachable), neighbours); each is drawn with probability proportional to
        how many destinations it is the `unicast_all` next hop for, favouring far ends of bottlenecks.
        """
        rng = rng or random.Random()
        weights: dict[PeerName, int] = {}
        for hop in self.unicast_all.values():
            if hop != exclude:
                weights[hop] = weights.get(hop, 0) + 1
        if not weights:
            return []
        k = min(len(weights), max(1, int(2 * math.log2(len(self.unicast_all) + 1))))
        chosen: list[PeerName] = []
        candidates = sorted(weights)
        while len(chosen) < k:
            pick = rng.choices(candidates, weights=[weights[c] for c in candidates])[0]
            chosen.append(pick)
            candidates.remove(pick)
        return chosen


def compute_routes(local: PeerName, peers: Mapping[PeerName, PeerSummary]) -> Routes:
    """Build the route tables for `local` from a topology snapshot (the mapping is copied)."""
    links = {True: adjacency(peers, True), False: adjacency(peers, False)}
    _, unicast = _search(links[True], local)
    _, unicast_all = _search(links[False], local)
    return Routes(
        local=local,
        unicast={dst: hop for dst, hop in unicast.items() if hop is not None},
        unicast_all={dst: hop for dst, hop in unicast_all.items() if hop is not None},
        _links=links,
    )
