"""IPAM across several in-process routers (real TCP on loopback, fast timings).

Scenarios: consensus among three gives one ring and disjoint allocations; a peer with no space
gets a donation; seed mode works without a network; observers get the ring (and can call the
election); rings over another range or seed are refused, visibly, without cutting the connection;
rmpeer on two peers at once converges on one owner; reset hands our space to a peer that confirms.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

import pytest
import trio

from tests.ipam_cluster import Cluster, all_addresses, ring_view, scenario
from tests.mesh_harness import eventually
from weavenet.ipam.errors import IpamError


async def allocate_many(alloc: object, prefix: str, n: int, out: list[IPv4Interface]) -> None:
    for i in range(n):
        out.append(await alloc.allocate(f"{prefix}-{i}", timeout=10))  # type: ignore[attr-defined]


@scenario(timeout=40)
async def test_consensus_of_three_gives_one_ring_and_disjoint_allocations(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    for i in range(3):
        await cluster.start(i, init="consensus=3", connect=[j for j in range(i)])
    await eventually(lambda: all(len(cluster.routers[i].connected_peers()) == 2 for i in range(3)), "a full mesh")
    got: dict[int, list[IPv4Interface]] = {0: [], 1: [], 2: []}
    async with trio.open_nursery() as nursery:  # all three ask at once: one election, one ring
        for i in range(3):
            nursery.start_soon(allocate_many, cluster[i], f"h{i}", 30, got[i])
    addresses = all_addresses([cluster[i] for i in range(3)])
    assert len(addresses) == 90 and len(set(addresses)) == 90, "no address may be handed out twice"
    await eventually(lambda: ring_view(cluster[0]) == ring_view(cluster[1]) == ring_view(cluster[2]), "rings agree")
    for i in range(3):
        owned = cluster[i].ring.owned_ranges()
        assert owned, f"peer {i} owns no space"
        for address in got[i]:
            assert any(s <= int(address.ip) < e for s, e in owned), f"{address} is not in peer {i}'s ranges"
    assert "initialised by consensus" in caplog.text
    assert cluster[0].report()["Seeds"] == cluster[1].report()["Seeds"]


@scenario()
async def test_a_peer_without_space_gets_a_donation(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    a = await cluster.start(0, init=f"seed={cluster.name(0)}")  # the whole range is A's
    b = await cluster.start(1, init=f"seed={cluster.name(0)}", connect=[0])
    await eventually(lambda: cluster.connected(1, 0), "B connected to A")
    address = await b.allocate("c1", timeout=10)
    assert b.ring.owner(int(address.ip)) == cluster.name(1)
    # Weave Net's split: A gives half of its /12, an aligned /13, to B.
    assert b.ring.owned_ranges() == [(int(IPv4Network("10.40.0.0/13").network_address), 0x0A300000)]
    await eventually(lambda: ring_view(a) == ring_view(b), "A to see its donation")
    assert (await a.allocate("c2")).ip != address.ip
    # A claim of an address A owns and has free is a single-address donation.
    await b.claim("static", IPv4Interface("10.32.0.9/12"), timeout=10)
    assert b.ring.owner(0x0A200009) == cluster.name(1)
    # ... but one A has in use is refused, saying who has it.
    held = (await a.allocate("c3")).ip
    with pytest.raises(IpamError, match=rf"^address {held} is owned by other peer 0e:00:00:00:00:01\(host0\), which"):
        await b.claim("c4", IPv4Interface(f"{held}/12"), timeout=10)


@scenario()
async def test_seeded_peers_allocate_apart_and_merge_cleanly(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    seed = f"seed={cluster.name(0)},{cluster.name(1)}"
    a = await cluster.start(0, init=seed)
    b = await cluster.start(1, init=seed)  # not connected: no network needed to allocate
    got_a = [await a.allocate(f"a{i}", timeout=1) for i in range(5)]
    got_b = [await b.allocate(f"b{i}", timeout=1) for i in range(5)]
    assert not {x.ip for x in got_a} & {x.ip for x in got_b}
    await cluster.routers[1].connect([cluster.addr(0)])
    await eventually(lambda: ring_view(a) == ring_view(b) and a.ring.entries()[0].free < 2**19, "rings to merge")
    assert a.report()["Refused"] == {} and b.report()["Refused"] == {}


@scenario()
async def test_observers_get_the_ring_and_can_call_the_election(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    a = await cluster.start(0, init="consensus=2")
    b = await cluster.start(1, init="consensus=2", connect=[0])
    c = await cluster.start(2, init="observer", connect=[0, 1])
    await eventually(lambda: len(cluster.routers[2].connected_peers()) == 2, "the observer connected")
    await trio.sleep(0.5)
    assert a.ring.is_empty() and b.ring.is_empty() and c.ring.is_empty(), "consensus is deferred until asked"
    address = await c.allocate("c1", timeout=10)  # the observer asks; the electors elect
    assert c.ring.owner(int(address.ip)) == cluster.name(2)
    assert str(cluster.name(2)) not in c.report()["Seeds"], "observers never vote"
    await eventually(lambda: ring_view(a) == ring_view(b) == ring_view(c), "one ring everywhere")


@scenario()
async def test_a_ring_over_another_range_is_refused_visibly_and_harmlessly(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    a = await cluster.start(0, init="consensus=1")
    await a.allocate("c1")
    before = ring_view(a)
    b = await cluster.start(1, init="consensus=1", ipalloc_range=IPv4Network("10.40.0.0/16"), connect=[0])
    await b.allocate("c1")
    message = "Incompatible IP allocation ranges (received: 10.40.0.0/16, ours: 10.32.0.0/12)"
    await eventually(lambda: message in a.report()["Refused"].get(str(cluster.name(1)), ""), "A to refuse B's ring")
    assert message in a.status_text()
    assert ring_view(a) == before
    await trio.sleep(1.5)  # a few anti-entropy rounds: the connection stays up, the log says it once
    assert cluster.connected(0, 1), "an IPAM disagreement must not cut the mesh connection"
    assert caplog.text.count(message) == 1


@scenario()
async def test_rings_seeded_differently_are_refused_with_the_seeds_named(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    a = await cluster.start(0, init=f"seed={cluster.name(0)}")
    b = await cluster.start(1, init=f"seed={cluster.name(1)}", connect=[0])
    await a.allocate("c1")
    await b.allocate("c1")
    expected = "IP allocation was seeded by different peers (received: [0e:00:00:00:00:02], ours: [0e:00:00:00:00:01])"
    await eventually(lambda: any(expected in m for m in a.report()["Refused"].values()), "A to refuse B's ring")
    assert [e.peer for e in a.ring.entries()] == [cluster.name(0)]
    await a.allocate("c2")  # both keep working on their own rings
    await b.allocate("c2")
    assert cluster.connected(0, 1)
    assert "refused ring from 0e:00:00:00:00:02" in a.status_text()


@scenario(timeout=40)
async def test_rmpeer_on_two_peers_at_once_converges_on_one_owner(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    for i in range(3):
        await cluster.start(i, init="consensus=3", connect=list(range(i)))
    await eventually(lambda: all(len(cluster.routers[i].connected_peers()) == 2 for i in range(3)), "a full mesh")
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(cluster[i].allocate, f"c{i}")
    await eventually(lambda: ring_view(cluster[0]) == ring_view(cluster[1]) == ring_view(cluster[2]), "rings agree")
    dead = cluster.name(2)
    dead_size = cluster[0].ring.size_by_owner()[dead]
    with pytest.raises(IpamError, match="is reachable, so it is not dead"):
        await cluster[0].rmpeer("host2")
    cluster.stop(2)
    await eventually(lambda: not cluster[0]._reachable(dead) and not cluster[1]._reachable(dead), "C unreachable")
    replies: dict[int, str] = {}

    async def rmpeer(i: int) -> None:
        replies[i] = await cluster[i].rmpeer("host2")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rmpeer, 0)
        nursery.start_soon(rmpeer, 1)
    a, b = cluster[0], cluster[1]
    await eventually(lambda: ring_view(a) == ring_view(b), "A and B to agree")
    assert dead not in a.ring.peers()
    winners = {p for p in a.ring.peers() if a.ring.size_by_owner()[p] >= dead_size}
    assert winners, "somebody owns the dead peer's space"
    taken = {i: int(replies[i].split()[0]) for i in (0, 1)}
    assert sorted(taken.values()) == [0, dead_size], f"taken over exactly once: {replies}"
    # Both keep allocating, with no duplicates, including in the space taken over.
    got = [await a.allocate(f"a{i}", timeout=10) for i in range(20)] + [
        await b.allocate(f"b{i}", timeout=10) for i in range(20)
    ]
    assert len({x.ip for x in got}) == 40
    assert a.report()["Disputed"] == [] and b.report()["Disputed"] == []
    # Again: nothing left to take.
    assert (await a.rmpeer(str(dead))).startswith("0 IPs taken over from 0e:00:00:00:00:03")


@scenario()
async def test_rmpeer_refuses_an_ambiguous_nickname(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    a = await cluster.start(0, init="consensus=1")
    await cluster.start(1, init="consensus=1", connect=[0], nickname="twin")
    await cluster.start(2, init="consensus=1", connect=[0], nickname="twin")
    await eventually(lambda: len(cluster.routers[0].connected_peers()) == 2, "both twins connected")
    await a.allocate("c1")
    with pytest.raises(IpamError, match=r"^nickname 'twin' is ambiguous \(0e:00:00:00:00:02, 0e:00:00:00:00:03\)"):
        await a.rmpeer("twin")
    with pytest.raises(IpamError, match=r"^no peer with the name or nickname 'nobody'$"):
        await a.rmpeer("nobody")
    with pytest.raises(IpamError, match=r"^cannot rmpeer ourselves"):
        await a.rmpeer("host0")


@scenario()
async def test_reset_hands_our_space_to_a_peer_that_confirms(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    a = await cluster.start(0, init="consensus=2")
    b = await cluster.start(1, init="consensus=2", connect=[0])
    await eventually(lambda: cluster.connected(0, 1), "connected")
    await a.allocate("c1", timeout=10)
    await b.allocate("c1", timeout=10)
    await eventually(lambda: ring_view(a) == ring_view(b), "rings agree")
    await a.leave()
    assert a.ring.owned_ranges() == []
    assert b.ring.peers() == [cluster.name(1)], "B holds the whole range once it confirmed"
    with pytest.raises(IpamError, match="being reset"):
        await a.allocate("c2")
    assert "confirmed it holds our former ranges" in caplog.text


@scenario()
async def test_observers_cannot_vote_but_a_second_elector_completes_the_quorum(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    a = await cluster.start(0, init="consensus=2")
    await cluster.start(1, init="observer", connect=[0])
    await eventually(lambda: cluster.connected(0, 1), "the observer connected")
    with pytest.raises(IpamError, match="waiting for consensus"):
        await a.allocate("c1", timeout=0.5)
    await cluster.start(2, init="consensus=2", connect=[1])  # reaches A only through the observer
    address = await a.allocate("c1", timeout=10)
    assert a.ring.owner(int(address.ip)) == cluster.name(0)
    assert str(cluster.name(1)) not in a.report()["Seeds"]


@scenario()
async def test_consensus_state_survives_a_restart_and_deferred_claims_land(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    a = await cluster.start(0, init="consensus=2")
    # noErrorOnUnknown: the claim returns at once and is applied once a ring exists.
    await a.claim("static", IPv4Interface("10.32.0.5/12"), no_error_on_unknown=True)
    with pytest.raises(IpamError):
        await a.prime(timeout=0.3)
    assert a._paxos is not None
    promised = a._paxos.ours.promise
    assert promised.round >= 1
    cluster.stop(0)
    a = await cluster.start(0, init="consensus=2")
    assert a._paxos is not None and a._paxos.ours.promise == promised, "the acceptor keeps its promises"
    b = await cluster.start(1, init="consensus=2", connect=[0])
    await b.prime(timeout=10)
    await eventually(lambda: not a.ring.is_empty(), "A to get the ring")
    await eventually(lambda: a.ring.is_allocated(0x0A200005) or b.ring.is_allocated(0x0A200005), "the claim")
    assert a.lookup("static") == [IPv4Interface("10.32.0.5/12")]
