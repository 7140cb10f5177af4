"""The allocator on one router, as the Docker plugin, `attach` and the HTTP API use it.

Allocate (lowest first, idempotent per id, in a subnet), free by id or address, Weave Net's claim
rules, the exhaustion error, bounded waits that end in a message saying what was missing, and
what a restart keeps (or discards: another range, another peer name).
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network

import pytest

from tests.ipam_cluster import Cluster, scenario
from weavenet.ipam.allocator import Allocator
from weavenet.ipam.errors import IpamError

SMALL = IPv4Network("10.2.0.0/24")


@scenario()
async def test_allocate_is_lowest_first_idempotent_and_subnet_aware(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    assert await alloc.allocate("c1") == IPv4Interface("10.2.0.1/24")
    assert await alloc.allocate("c1") == IPv4Interface("10.2.0.1/24"), "the same id gets the same address"
    assert await alloc.allocate("c2") == IPv4Interface("10.2.0.2/24")
    # In a subnet: its own prefix, never its network address.
    assert await alloc.allocate("c3", IPv4Network("10.2.0.128/25")) == IPv4Interface("10.2.0.129/25")
    assert await alloc.allocate("c1", IPv4Network("10.2.0.128/25")) == IPv4Interface("10.2.0.130/25")
    assert alloc.lookup("c1") == [IPv4Interface("10.2.0.1/24"), IPv4Interface("10.2.0.130/25")]
    assert alloc.lookup("c1", IPv4Network("10.2.0.128/25")) == [IPv4Interface("10.2.0.130/25")]
    # Anonymous allocations are filed under the address, so they can be freed by address.
    anonymous = await alloc.allocate("_")
    assert alloc.lookup(str(anonymous.ip)) == [anonymous]
    assert await alloc.free("_", anonymous.ip) == [anonymous]
    assert alloc.report()["Status"] == "ready"


@scenario()
async def test_bad_subnets_and_ids_are_refused_with_one_line_errors(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    cases = [
        ("c1", IPv4Network("10.9.0.0/24"), "subnet 10.9.0.0/24 is outside the allocation range 10.2.0.0/24"),
        ("c1", IPv4Network("10.2.0.4/31"), "subnet 10.2.0.4/31 is too small to allocate in: use /30 or larger"),
        ("", None, "invalid id ''"),
        ("has space", None, "invalid id 'has space'"),
    ]
    for ident, subnet, message in cases:
        with pytest.raises(IpamError) as caught:
            await alloc.allocate(ident, subnet)
        assert str(caught.value).startswith(message)
        assert caught.value.kind == "invalid"
        assert "\n" not in str(caught.value)
    assert alloc.owned() == {}


@scenario()
async def test_free_by_id_and_by_address_and_reuse(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    a = await alloc.allocate("c1")
    b = await alloc.allocate("c1", IPv4Network("10.2.0.64/26"))
    c = await alloc.allocate("c2")
    assert await alloc.free("c1", b.ip) == [b]
    assert await alloc.free("c1", b.ip) == [], "freeing twice releases nothing"
    assert await alloc.free("c2", a.ip) == [], "c2 does not hold c1's address"
    assert await alloc.free("c1") == [a]
    assert await alloc.free("c1") == []
    assert alloc.owned() == {"c2": [c]}
    assert await alloc.allocate("c3") == a, "a freed address is handed out again, lowest first"


@scenario()
async def test_claim_rules(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    await alloc.claim("c1", IPv4Interface("10.2.0.7/24"))
    await alloc.claim("c1", IPv4Interface("10.2.0.7/24"))  # the same id again: fine
    await alloc.claim("_", IPv4Interface("10.2.0.7/24"))  # anonymous re-claim: can't prove otherwise
    with pytest.raises(IpamError, match=r"^address 10\.2\.0\.7 is already owned by c1$") as caught:
        await alloc.claim("c2", IPv4Interface("10.2.0.7/24"))
    assert caught.value.kind == "conflict"
    # Held anonymously (under its own text): a real id cannot take it.
    await alloc.claim("_", IPv4Interface("10.2.0.8/24"))
    with pytest.raises(IpamError, match=r"^address 10\.2\.0\.8 is already in use$"):
        await alloc.claim("c2", IPv4Interface("10.2.0.8/24"))
    # Outside the range only this host's records count.
    await alloc.claim("c3", IPv4Interface("192.168.7.5/24"))
    with pytest.raises(IpamError, match=r"^address 192\.168\.7\.5 is already in use by c3$"):
        await alloc.claim("c4", IPv4Interface("192.168.7.5/24"))
    # A claimed address is never allocated.
    got = {str((await alloc.allocate(f"x{i}")).ip) for i in range(10)}
    assert not got & {"10.2.0.7", "10.2.0.8"}
    assert alloc.lookup("c1") == [IPv4Interface("10.2.0.7/24")]


@scenario()
async def test_exhaustion_is_an_immediate_clear_error(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=IPv4Network("10.2.0.0/28"))
    got = [await alloc.allocate(f"c{i}") for i in range(14)]  # .1 - .14: not .0, not .15
    assert [str(a.ip) for a in got] == [f"10.2.0.{i}" for i in range(1, 15)]
    with pytest.raises(IpamError, match=r"^no free addresses in 10\.2\.0\.0/28$") as caught:
        await alloc.allocate("one-too-many", timeout=None)
    assert caught.value.kind == "unavailable"
    await alloc.free("c3")
    assert await alloc.allocate("one-too-many") == IPv4Interface("10.2.0.4/28")


@scenario()
async def test_waiting_for_consensus_is_bounded_and_says_why(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    # consensus=3: a quorum of 2, and this peer is alone.
    alloc = await cluster.start(0, init="consensus=3")
    with pytest.raises(IpamError) as caught:
        await alloc.allocate("c1", timeout=0.5)
    assert str(caught.value) == "IPAM not ready: waiting for consensus, 1 of 2 peers seen (gave up after 0.5s)"
    assert caught.value.kind == "unavailable"
    assert alloc.report()["Status"] == "awaiting consensus (quorum: 2, known: 1)"
    with pytest.raises(IpamError, match="waiting for consensus"):
        await alloc.prime(timeout=0.2)
    assert alloc.pending_allocates == 0 and alloc.owned() == {}


@scenario()
async def test_an_observer_alone_waits_for_a_ring_and_says_so(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, init="observer")
    assert alloc.report()["Status"] == "idle"
    with pytest.raises(IpamError, match=r"^IPAM not ready: waiting for a peer to share the ring \(this peer is an obs"):
        await alloc.allocate("c1", timeout=0.3)
    assert alloc.ring.is_empty()


@scenario()
async def test_a_restart_keeps_allocations_and_never_reissues_them(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    before = {f"c{i}": await alloc.allocate(f"c{i}") for i in range(5)}
    await alloc.claim("static", IPv4Interface("10.2.0.200/24"))
    await alloc.claim("outside", IPv4Interface("192.168.1.1/24"))
    await alloc.free("c2")
    cluster.stop(0)
    alloc = await cluster.start(0, ipalloc_range=SMALL)
    owned = alloc.owned()
    assert owned == {
        **{k: [v] for k, v in before.items() if k != "c2"},
        "outside": [IPv4Interface("192.168.1.1/24")],
        "static": [IPv4Interface("10.2.0.200/24")],
    }
    assert await alloc.allocate("c0") == before["c0"], "idempotent across the restart"
    fresh = [await alloc.allocate(f"new{i}") for i in range(5)]
    held = {a.ip for addrs in owned.values() for a in addrs}
    assert not {a.ip for a in fresh} & held, "a restarted router must not hand out addresses still held"
    assert fresh[0] == before["c2"], "the one freed before the restart is free again"


@scenario()
async def test_persisted_data_for_another_range_is_discarded(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, ipalloc_range=IPv4Network("10.2.0.0/16"))
    await alloc.allocate("c1")
    cluster.stop(0)
    alloc = await cluster.start(0, ipalloc_range=IPv4Network("10.3.0.0/16"))
    assert "persisted IPAM data is for range 10.2.0.0/16 but --ipalloc-range is 10.3.0.0/16" in caplog.text
    assert alloc.owned() == {}
    assert await alloc.allocate("c2", timeout=5) == IPv4Interface("10.3.0.1/16")


def test_the_check_ident_rule_is_shared_with_the_http_layer():
    Allocator.check_ident("0123456789abcdef" * 4)
    Allocator.check_ident("weave:expose")
    for bad in ["", "a/b", "x" * 257, "tab\there", "ünicode"]:
        with pytest.raises(IpamError):
            Allocator.check_ident(bad)


@scenario()
async def test_addresses_ending_in_0_or_255_are_handed_out_last(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    # A /23 range allocated in its default subnet: the inner .255 and .0 come last.
    alloc = await cluster.start(0, ipalloc_range=IPv4Network("10.2.0.0/23"))
    got = [str((await alloc.allocate(f"c{i}")).ip) for i in range(510)]
    assert got[:3] == ["10.2.0.1", "10.2.0.2", "10.2.0.3"]
    assert got[254:256] == ["10.2.1.1", "10.2.1.2"], "10.2.0.255 and 10.2.1.0 are skipped"
    assert got[-2:] == ["10.2.0.255", "10.2.1.0"], "and used only when nothing else is free"
    assert len(set(got)) == 510
    await alloc.free("c5")
    (c300,) = await alloc.free("c300")
    assert str((await alloc.allocate("again")).ip) == "10.2.0.6", "a freed address is found below the scan point"
    # In a /24 subnet, .0 and .255 are its network and broadcast addresses: the rule does not apply.
    assert await alloc.allocate("y", IPv4Network("10.2.1.0/24")) == IPv4Interface(f"{c300.ip}/24")
