"""Scenario tests of the IPAM ring's Python API: what the allocator does, what a user would see.

Peers are built the way a cluster would build them: seeded alike, gossiping whole rings, asking
each other for space. Errors are one line and say what was wrong.
"""

from __future__ import annotations

import ipaddress

import pytest

from weavenet._fastdp import Ring, RingDecodeError, RingEntry, RingError, RingMismatchError
from weavenet.mesh.peer_name import PeerName

HOST1 = PeerName.parse("::1")
HOST2 = PeerName.parse("::2")
HOST3 = PeerName.parse("::3")


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def cidr(text: str) -> tuple[int, int]:
    net = ipaddress.IPv4Network(text)
    return int(net.network_address), int(net.network_address) + net.num_addresses


def text(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def seeded(peer: int, seed: list[int], universe: str = "10.32.0.0/12") -> Ring:
    ring = Ring(*cidr(universe), peer)
    ring.claim_for_peers(seed)
    return ring


def test_three_seeded_peers_build_the_same_aligned_ring():
    rings = [seeded(p, [HOST3, HOST1, HOST2, HOST1]) for p in (HOST1, HOST2, HOST3)]
    assert all(r.entries() == rings[0].entries() and r.cluster_id == rings[0].cluster_id for r in rings)
    status = [(text(e.token), e.size, e.peer, e.version) for e in rings[0].entries()]
    assert status == [
        ("10.32.0.0", 1 << 19, HOST1, 0),
        ("10.40.0.0", 1 << 18, HOST2, 0),
        ("10.44.0.0", 1 << 18, HOST3, 0),
    ]
    assert rings[0].owned_ranges() == [cidr("10.32.0.0/13")]
    assert rings[0].size_by_owner() == {HOST1: 1 << 19, HOST2: 1 << 18, HOST3: 1 << 18}
    assert rings[0].free_by_owner() == rings[0].size_by_owner()
    assert rings[0].cluster_id == Ring.cluster_id_for_seed({HOST1, HOST2, HOST3})
    assert rings[0].range_text == "10.32.0.0/12"
    assert not any(r.merge(rings[0]) for r in rings[1:])


def test_allocation_is_lowest_first_in_the_host_range_and_reuses_freed_addresses():
    ring = seeded(HOST1, [HOST1])
    first, last = cidr("10.32.0.0/24")
    host_range = (first + 1, last - 1)
    got = [ring.allocate(*host_range) for _ in range(3)]
    assert [text(a) for a in got] == ["10.32.0.1", "10.32.0.2", "10.32.0.3"]
    assert ring.release(ip("10.32.0.2")) is True
    assert ring.release(ip("10.32.0.2")) is False
    assert text(ring.allocate(*host_range)) == "10.32.0.2"
    assert ring.allocated_count() == 3
    assert ring.allocated_ranges() == [(ip("10.32.0.1"), ip("10.32.0.4"))]
    assert ring.free_count() == (1 << 20) - 3
    assert ring.entries()[0].free == (1 << 20) - 3  # our hint follows every allocation


def test_a_subnet_outside_the_range_is_refused_and_a_full_one_returns_none():
    ring = seeded(HOST1, [HOST1, HOST2], universe="10.2.0.0/30")
    assert ring.allocate() == ip("10.2.0.0")
    assert ring.allocate() == ip("10.2.0.1")
    assert ring.allocate() is None  # the rest is HOST2's: ask a donor
    assert ring.choose_donors() == [HOST2]
    with pytest.raises(RingError, match=r"^10\.3\.0\.0/16 does not overlap the ring range 10\.2\.0\.0/30$"):
        ring.allocate(*cidr("10.3.0.0/16"))


def test_space_request_splits_a_slash_12_into_two_slash_13s():
    """Weave Net's TestSpaceRequest: the donor gives half, aligned; the requester then allocates."""
    host1 = seeded(HOST1, [HOST1])
    host2 = Ring(*cidr("10.32.0.0/12"), HOST2)
    assert host2.merge(host1) is True
    assert host2.allocate() is None
    donors = host2.choose_donors()
    assert donors == [HOST1]
    block = host1.donate(host2.start, host2.end, HOST2)
    assert block == cidr("10.40.0.0/13")
    assert host2.merge(host1) is True
    assert host2.report_free() is False  # the donor reported the block free, and it is
    assert text(host2.allocate()) == "10.40.0.0"
    assert host1.owned_ranges() == [cidr("10.32.0.0/13")]
    assert host2.owned_ranges() == [cidr("10.40.0.0/13")]
    assert [(text(e.token), e.peer) for e in host2.entries()] == [("10.32.0.0", HOST1), ("10.40.0.0", HOST2)]


def test_claiming_an_address_another_peer_owns_takes_a_single_address_donation():
    host1 = seeded(HOST1, [HOST1, HOST2], universe="10.2.0.0/16")
    host2 = seeded(HOST2, [HOST1, HOST2], universe="10.2.0.0/16")
    wanted = ip("10.2.128.1")
    with pytest.raises(
        RingError, match=r"^cannot claim 10\.2\.128\.1: it is owned by peer 00:00:00:00:00:02, not by us$"
    ):
        host1.claim_address(wanted)
    assert host2.donate(wanted, wanted + 1, HOST1) == (wanted, wanted + 1)
    host1.merge(host2)
    assert host1.claim_address(wanted) is True
    assert host1.claim_address(wanted) is False  # already ours and held
    # An address the owner has allocated is denied.
    host2.claim_address(ip("10.2.128.4"))
    assert host2.donate(ip("10.2.128.4"), ip("10.2.128.5"), HOST1) is None


def test_grant_refuses_what_we_do_not_own_or_hold():
    ring = seeded(HOST1, [HOST1, HOST2], universe="10.2.0.0/16")
    with pytest.raises(RingError, match=r"^cannot grant 10\.2\.200\.0/24: we do not own all of it$"):
        ring.grant(*cidr("10.2.200.0/24"), HOST3)
    ring.claim_address(ip("10.2.0.9"))
    with pytest.raises(RingError, match=r"^cannot grant 10\.2\.0\.0/24: 1 address\(es\) in it are allocated$"):
        ring.grant(*cidr("10.2.0.0/24"), HOST3)
    with pytest.raises(RingError, match="to ourselves"):
        ring.grant(*cidr("10.2.1.0/24"), HOST1)
    with pytest.raises(RingError, match="must be a non-zero 48-bit value"):
        ring.grant(*cidr("10.2.1.0/24"), 0)
    ring.grant(*cidr("10.2.1.0/24"), HOST3)
    assert ring.owner(ip("10.2.1.77")) == HOST3
    assert ring.owner(ip("10.2.2.0")) == HOST1


def test_merging_a_ring_over_another_range_is_refused_with_both_ranges_named():
    ours = seeded(HOST1, [HOST1])
    theirs = seeded(HOST2, [HOST2], universe="10.40.0.0/16")
    before = ours.to_bytes()
    with pytest.raises(RingMismatchError) as caught:
        ours.merge(theirs)
    assert str(caught.value) == (
        "ring range mismatch: ours 10.32.0.0/12, theirs 10.40.0.0/16 (every peer must use the same allocation range)"
    )
    assert isinstance(caught.value, ValueError)
    assert ours.to_bytes() == before


def test_rings_seeded_by_different_peers_never_merge():
    """Two isolated peers formed separate rings (spec §2, test 360): an error, not a crash."""
    ours = seeded(HOST1, [HOST1])
    theirs = seeded(HOST2, [HOST2])
    with pytest.raises(RingMismatchError, match=r"^ring cluster mismatch: ours 0x[0-9a-f]{16}, theirs 0x[0-9a-f]{16} "):
        ours.merge(theirs)
    # An orchestrator-given cluster id is enforced the same way, even on an empty ring.
    pinned = Ring(*cidr("10.32.0.0/12"), HOST3, cluster_id=42)
    with pytest.raises(RingMismatchError):
        pinned.merge(ours)
    assert pinned.is_empty()


def test_an_observer_adopts_the_first_ring_it_hears_and_merging_twice_changes_nothing():
    ring = seeded(HOST1, [HOST1, HOST2])
    observer = Ring(ring.start, ring.end, HOST3)
    assert observer.owner(ring.start) is None
    assert observer.merge(ring) is True
    assert observer.merge(ring) is False
    assert observer.merge(observer) is False
    assert observer.cluster_id == ring.cluster_id
    assert observer.owner(ip("10.47.255.255")) == HOST2


def test_rmpeer_takes_over_a_dead_peers_ranges_and_reports_the_count():
    host2 = seeded(HOST2, [HOST1, HOST2, HOST3])
    taken = host2.transfer(HOST1, HOST2)
    assert sum(e - s for s, e in taken) == 1 << 19  # "524288 IPs taken over from 00:00:00:00:00:01"
    assert [e.version for e in host2.entries() if e.peer == HOST2] == [100, 0]
    host3 = seeded(HOST3, [HOST1, HOST2, HOST3])
    assert host3.merge(host2) is True
    assert HOST1 not in host3.peers()


def test_double_rmpeer_converges_and_the_loser_sees_its_disputed_addresses():
    """The same dead peer removed on two sides of a partition: equal versions, different owners.
    Weave Net cuts the connection ("Inconsistent entries"); here both sides converge on the higher
    peer name and the loser's allocations there show up as disputed."""
    host2 = seeded(HOST2, [HOST1, HOST2, HOST3])
    host3 = seeded(HOST3, [HOST1, HOST2, HOST3])
    host2.transfer(HOST1, HOST2)
    host3.transfer(HOST1, HOST3)
    lost = host2.allocate(*cidr("10.32.0.0/13"))
    assert lost == ip("10.32.0.0")
    h2, h3 = host2.copy(), host3.copy()
    host2.merge(h3)
    host3.merge(h2)
    assert [e.as_tuple()[:4] for e in host2.entries()] == [e.as_tuple()[:4] for e in host3.entries()]
    assert host2.owner(lost) == HOST3
    assert host2.disputed_ranges() == [(lost, lost + 1)]
    assert host2.allocate(*cidr("10.32.0.0/13")) is None  # never handed out again


def test_persisted_ring_round_trips_without_allocations():
    ring = seeded(HOST1, [HOST1, HOST2])
    ring.allocate()
    ring.grant(*cidr("10.36.0.0/14"), HOST3)
    data = ring.to_bytes()
    restored = Ring.from_bytes(data)
    assert restored.peer == HOST1
    assert restored.entries() == ring.entries()
    assert restored.allocated_count() == 0
    assert restored.to_bytes() == data
    assert restored.report_free() is True  # nothing allocated yet: our hints go back up
    assert restored.claim_address(ip("10.32.0.0")) is True  # re-claim what the allocator persisted
    assert Ring.FORMAT_VERSION == data[2] == 1


def test_garbage_bytes_are_refused_with_a_reason():
    good = seeded(HOST1, [HOST1, HOST2]).to_bytes()
    cases = {
        b"": "truncated",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(20): "bad magic",
        good[:2] + b"\x07" + good[3:]: "unsupported format version 7",
        good[:-1]: "checksum mismatch",
        good[:-5] + bytes([good[-5] ^ 0x40]) + good[-4:]: "checksum mismatch",
    }
    for data, reason in cases.items():
        with pytest.raises(RingDecodeError, match=f"^invalid ring encoding: .*{reason}"):
            Ring.from_bytes(data)
    assert issubclass(RingDecodeError, RingError) and issubclass(RingError, ValueError)


def test_bad_arguments_are_refused_in_one_line():
    with pytest.raises(RingError, match=r"^invalid address range \[10, 10\)"):
        Ring(10, 10, HOST1)
    with pytest.raises(RingError, match="invalid local peer name 0x0"):
        Ring(0, 256, 0)
    with pytest.raises(RingError, match="a ring needs at least one seed peer"):
        Ring(0, 256, HOST1).claim_for_peers([])
    ring = seeded(HOST1, [HOST1], universe="10.0.0.0/24")
    with pytest.raises(RingError, match="already initialised"):
        ring.claim_for_peers([HOST1])
    with pytest.raises(RingError, match=r"^address 10\.0\.1\.0 is outside the ring range 10\.0\.0\.0/24$"):
        ring.release(ip("10.0.1.0"))
    with pytest.raises(RingError, match="cannot donate to ourselves"):
        ring.donate(ring.start, ring.end, HOST1)
    with pytest.raises(RingError, match="not initialised"):
        Ring(ring.start, ring.end, HOST1).claim_address(ring.start)


def test_copies_are_independent_and_entries_are_values():
    ring = seeded(HOST1, [HOST1, HOST2])
    copy = ring.copy()
    copy.allocate()
    assert ring.allocated_count() == 0
    entry = ring.entries()[0]
    assert isinstance(entry, RingEntry)
    assert entry == ring.entries()[0] and entry != copy.entries()[0]  # the copy's hint moved
    assert hash(entry) == hash(ring.entries()[0])
    assert "token=10.32.0.0" in repr(entry) and "peer=00:00:00:00:00:01" in repr(entry)
    assert repr(ring).startswith("Ring(10.32.0.0/12, peer=00:00:00:00:00:01, entries=2")


def test_whole_ipv4_space_and_non_cidr_ranges_work():
    everything = seeded(HOST1, [HOST1, HOST2], universe="0.0.0.0/0")
    assert everything.end == 1 << 32
    assert everything.owner((1 << 32) - 1) == HOST2
    odd = Ring(ip("10.0.0.1"), ip("10.0.0.7"), HOST1)
    assert odd.range_text == "10.0.0.1-10.0.0.6"
    odd.claim_for_peers([HOST1, HOST2])
    assert odd.size_by_owner() == {HOST1: 3, HOST2: 3}
