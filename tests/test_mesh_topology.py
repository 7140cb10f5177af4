"""Topology merge and GC: versions win, restarts win ties, we outbid stale copies of ourselves."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.topology import Topology, is_placeholder
from weavenet.mesh.wire import MAX_VERSION, ConnectionSummary, PeerSummary, decode_topology, encode_topology

US, A, B, C = (PeerName(0x0200000000 + i) for i in range(4))


def link(peer: PeerName, established: bool = True, outbound: bool = True) -> ConnectionSummary:
    return ConnectionSummary(peer, f"10.0.0.{int(peer) & 0xFF}:6783", outbound, established)


def record(name: PeerName, version: int = 1, uid: int = 100, links: tuple[PeerName, ...] = ()) -> PeerSummary:
    return PeerSummary(name, f"nick{int(name) & 0xFF}", uid, version, tuple(link(p) for p in links))


def topology() -> Topology:
    return Topology(US, "us", uid=42)


def test_a_new_peer_is_taken_and_reported_changed() -> None:
    topo = topology()
    result = topo.merge([record(A, links=(B,))])
    assert result.names == {A} and result.changed == {A} and result.new_peers == {A}
    assert topo.get(A) == record(A, links=(B,))
    assert is_placeholder(topo.peers[B]), "B is named only in A's links"


def test_higher_version_wins_and_lower_is_ignored() -> None:
    topo = topology()
    topo.merge([record(A, version=5)])
    assert topo.merge([record(A, version=4, links=(B,))]).changed == set()
    assert topo.get(A).version == 5
    assert topo.merge([record(A, version=6, links=(B,))]).changed == {A}
    assert topo.get(A).connections[0].peer == B


def test_equal_version_higher_uid_wins_as_a_restart() -> None:
    topo = topology()
    topo.merge([record(A, version=3, uid=10)])
    assert topo.merge([record(A, version=3, uid=5)]).changed == set()
    result = topo.merge([record(A, version=3, uid=11)])
    assert result.changed == {A} and result.restarted == {A}


def test_real_record_replaces_placeholder() -> None:
    topo = topology()
    topo.merge([record(A, links=(B,))])
    result = topo.merge([record(B, version=1)])
    assert result.new_peers == {B} and not is_placeholder(topo.peers[B])


def test_note_peer_never_overrides_a_record() -> None:
    topo = topology()
    topo.note_peer(A, "fresh", 77)
    assert is_placeholder(topo.peers[A]) and topo.peers[A].nickname == "fresh"
    topo.merge([record(A, version=2)])
    topo.note_peer(A, "again", 78)
    assert topo.get(A) == record(A, version=2)


def test_a_stale_record_of_ourselves_makes_us_outbid_it() -> None:
    topo = topology()
    topo.set_local_connections([link(A)])
    assert topo.local.version == 2
    old_incarnation = PeerSummary(US, "us", uid=7, version=9, connections=())
    result = topo.merge([old_incarnation])
    assert result.changed == {US}
    assert topo.local.version == 10 and topo.local.uid == 42, "we keep our uid and beat the old version"


def test_outbidding_the_highest_valid_version_still_fits_the_wire() -> None:
    topo = topology()
    topo.merge([PeerSummary(US, "us", uid=7, version=MAX_VERSION - 1, connections=())])
    assert topo.local.version == MAX_VERSION
    topo.set_local_connections([link(A)])
    assert topo.local.version == MAX_VERSION, "held at the ceiling rather than overflowing"
    assert decode_topology(encode_topology(topo.records([US])))[0] == topo.local


def test_an_old_copy_of_our_own_record_is_harmless() -> None:
    topo = topology()
    topo.set_local_connections([link(A)])
    mine = topo.local
    assert topo.merge([PeerSummary(US, "us", 42, 1, ())]).changed == set()
    assert topo.local == mine


def test_local_connections_bump_version_only_on_change() -> None:
    topo = topology()
    assert topo.set_local_connections([link(A), link(B)])
    assert not topo.set_local_connections([link(B), link(A)]), "order does not matter"
    assert topo.local.version == 2
    assert topo.set_local_connections([link(A, established=False), link(B)])
    assert topo.local.version == 3


def test_gc_removes_unreachable_peers_but_keeps_referenced_ones() -> None:
    topo = topology()
    topo.set_local_connections([link(A)])
    topo.merge([record(A, links=(US, B)), record(B, links=(A,)), record(C, links=())])
    removed = topo.gc()
    assert [r.name for r in removed] == [C]
    # A goes away: B is no longer reachable either, unless a local connection still references it.
    topo.set_local_connections([])
    assert {r.name for r in topo.gc(referenced={B})} == {A}
    assert set(topo.peers) == {US, B}


def test_records_leave_out_placeholders_and_sort() -> None:
    topo = topology()
    topo.merge([record(B, links=(C,)), record(A)])
    assert [r.name for r in topo.records()] == [US, A, B]
    assert [r.name for r in topo.records([C, B])] == [B]


# -- merge order independence ----------------------------------------------------------------

NAMES = [PeerName(0x0300000000 + i) for i in range(6)]


@st.composite
def updates(draw: st.DrawFn) -> list[PeerSummary]:
    """Records whose content is a function of (name, version, uid), as it is for real peers."""
    out = []
    for _ in range(draw(st.integers(1, 25))):
        name = draw(st.sampled_from(NAMES))
        version = draw(st.integers(1, 4))
        uid = draw(st.integers(1, 3))
        rng = random.Random(hash((name, version, uid)))
        links = tuple(p for p in [*NAMES, US] if p != name and rng.random() < 0.4)
        out.append(record(name, version, uid, links))
    return out


@settings(max_examples=200, deadline=None)
@given(updates(), st.randoms(use_true_random=False), st.integers(1, 5))
def test_merge_is_order_and_batching_independent(update: list[PeerSummary], rng: random.Random, batch: int) -> None:
    one = topology()
    one.set_local_connections([link(NAMES[0])])
    one.merge(update)
    shuffled = list(update)
    rng.shuffle(shuffled)
    two = topology()
    two.set_local_connections([link(NAMES[0])])
    for i in range(0, len(shuffled), batch):
        two.merge(shuffled[i : i + batch])
    assert one.records() == two.records()
    one.gc()
    two.gc()
    assert dict(one.peers) == dict(two.peers)


@settings(max_examples=100, deadline=None)
@given(updates())
def test_merging_twice_changes_nothing(update: list[PeerSummary]) -> None:
    topo = topology()
    topo.merge(update)
    assert topo.merge(update).changed == set()
