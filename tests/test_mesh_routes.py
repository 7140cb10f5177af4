"""Route tables: deterministic next hops over symmetric established links; broadcast trees."""

from __future__ import annotations

import random
from collections.abc import Iterable

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.routes import Routes, compute_routes
from weavenet.mesh.wire import ConnectionSummary, PeerSummary

A, B, C, D, E = (PeerName(0x0A0000000000 + i) for i in range(1, 6))


def mesh(
    links: Iterable[tuple[PeerName, PeerName]],
    *,
    one_way: Iterable[tuple[PeerName, PeerName]] = (),
    unestablished: Iterable[tuple[PeerName, PeerName]] = (),
) -> dict[PeerName, PeerSummary]:
    """Peers with symmetric established links, plus links listed by one end only or not established."""
    adjacency: dict[PeerName, list[ConnectionSummary]] = {}
    pending = set(unestablished)
    for x, y in links:
        for a, b in ((x, y), (y, x)):
            est = (a, b) not in pending
            adjacency.setdefault(a, []).append(ConnectionSummary(b, f"10.0.0.{int(b) & 0xFF}:6783", True, est))
    for a, b in one_way:
        adjacency.setdefault(a, []).append(ConnectionSummary(b, "10.0.0.9:6783", True, True))
        adjacency.setdefault(b, [])
    return {
        name: PeerSummary(name, str(name), 1, 1, tuple(sorted(conns, key=lambda c: c.peer)))
        for name, conns in adjacency.items()
    }


def test_line_topology() -> None:
    peers = mesh([(A, B), (B, C)])
    routes = compute_routes(A, peers)
    assert routes.unicast == {B: B, C: B}
    assert compute_routes(C, peers).unicast == {A: B, B: B}
    middle = compute_routes(B, peers)
    assert middle.unicast == {A: A, C: C}
    # B relays A's broadcasts to C, and C's to A; the ends relay nothing.
    assert middle.broadcast(A) == (C,)
    assert middle.broadcast(C) == (A,)
    assert middle.broadcast(B) == (A, C)
    assert routes.broadcast(C) == ()


def test_ring_picks_the_lower_named_first_hop_deterministically() -> None:
    # A-B-C-D-A: D is two hops from B either way; the BFS level is sorted, so via A (lower name).
    peers = mesh([(A, B), (B, C), (C, D), (D, A)])
    routes = compute_routes(B, peers)
    assert routes.unicast == {A: A, C: C, D: A}
    for _ in range(5):
        shuffled = dict(random.sample(list(peers.items()), len(peers)))
        assert compute_routes(B, shuffled).unicast == routes.unicast


def test_broadcast_reaches_every_peer_exactly_once() -> None:
    peers = mesh([(A, B), (B, C), (C, D), (D, A), (A, C), (D, E)])
    tables = {name: compute_routes(name, peers) for name in peers}
    for source in peers:
        received: list[PeerName] = []
        frontier = [source]
        while frontier:
            hop_from = frontier.pop()
            for nxt in tables[hop_from].broadcast(source):
                received.append(nxt)
                frontier.append(nxt)
        assert sorted(received) == sorted(set(peers) - {source}), f"broadcast from {source}"


def test_partition_has_no_routes_across() -> None:
    peers = mesh([(A, B), (C, D)])
    routes = compute_routes(A, peers)
    assert routes.unicast == {B: B}
    assert routes.broadcast(C) == ()


def test_asymmetric_and_unestablished_links_are_ignored_for_unicast_but_used_for_gossip() -> None:
    peers = mesh([(A, B)], one_way=[(B, C)])
    routes = compute_routes(A, peers)
    assert routes.unicast == {B: B}, "C does not list B back"
    assert routes.unicast_all == {B: B, C: B}
    peers = mesh([(A, B), (B, C)], unestablished=[(C, B)])
    routes = compute_routes(A, peers)
    assert routes.unicast == {B: B}, "C has not marked its link to B established"
    assert routes.unicast_all == {B: B, C: B}
    assert compute_routes(B, peers).broadcast_all(A) == (C,)
    assert compute_routes(B, peers).broadcast(A) == ()


def test_routes_of_an_unknown_source_are_empty() -> None:
    routes = Routes.empty(A)
    assert routes.broadcast(B) == () and routes.unicast == {}


def test_random_neighbours_picks_distinct_neighbours_and_honours_exclude() -> None:
    peers = mesh([(A, B), (A, C), (A, D), (D, E)])
    routes = compute_routes(A, peers)
    rng = random.Random(1)
    for _ in range(50):
        picked = routes.random_neighbours(rng=rng)
        assert len(picked) == len(set(picked)) and set(picked) <= {B, C, D}
        assert B not in routes.random_neighbours(exclude=B, rng=rng)
    # 2·log2(5) ≥ 3, so with 3 neighbours all of them are chosen.
    assert sorted(routes.random_neighbours(rng=rng)) == [B, C, D]
