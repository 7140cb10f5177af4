"""The IPAM gossip channel under hostile or broken input.

Malformed, oversized, foreign-range or forged messages are rejected before they touch state,
logged once per sender and reason, counted, and never cut the mesh connection that carried them.
"""

from __future__ import annotations

import msgpack
import pytest

from tests.ipam_cluster import Cluster, ring_view, scenario
from tests.mesh_harness import eventually
from weavenet._fastdp import Ring
from weavenet.ipam import wire
from weavenet.ipam.consensus import Claims, ProposalId
from weavenet.ipam.errors import IpamError
from weavenet.mesh.gossip import OpaqueGossipData
from weavenet.mesh.router import Router
from weavenet.store import Store

START, END = 0x0A200000, 0x0A300000


def state(sender: int = 5, **kw: object) -> wire.State:
    values: dict[str, object] = {"sender": sender, "start": START, "end": END}
    values.update(kw)
    return wire.State(**values)  # type: ignore[arg-type]


def seeded(peer: int, seeds: list[int], start: int = START, end: int = END) -> Ring:
    ring = Ring(start, end, peer)
    ring.claim_for_peers(seeds)
    return ring


def test_state_and_unicasts_round_trip():
    paxos = {5: Claims(ProposalId(2, 5), ProposalId(1, 6), (5, 6)), 6: Claims()}
    original = state(ring=seeded(5, [5, 6]), paxos=paxos, seeds=(5, 6), nicknames={5: "h5"}, want_ring=True)
    decoded = wire.decode_state(wire.encode_state(original))
    assert decoded.ring is not None and decoded.ring.to_bytes() == original.ring.to_bytes()  # type: ignore[union-attr]
    assert (decoded.paxos, decoded.seeds, decoded.nicknames, decoded.want_ring) == (paxos, (5, 6), {5: "h5"}, True)
    for message in (wire.SpaceRequest(START, START + 1), wire.SpaceDenied(START, END)):
        assert wire.decode_unicast(wire.encode_unicast(message)) == message
    update = wire.decode_unicast(wire.encode_unicast(wire.RingUpdate(state(), want_reply=True)))
    assert isinstance(update, wire.RingUpdate) and update.want_reply and update.state.sender == 5


def fields(**changes: object) -> bytes:
    base = [wire.FORMAT, 5, START, END, None, None, [], {}, False]
    names = ["format", "sender", "start", "end", "ring", "paxos", "seeds", "nicknames", "want_ring"]
    for key, value in changes.items():
        base[names.index(key)] = value
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1garbage", "not valid msgpack"),
        (b"\x00" * (wire.MAX_PAYLOAD + 1), "exceeds the"),
        (msgpack.packb([1, 2, 3]), "state has 3 fields"),
        (msgpack.packb(list(range(2000))), "not valid msgpack"),  # over the array cap
        (fields(format=2), "unsupported IPAM message format"),
        (fields(sender=0), "sender must be a non-zero 48-bit peer name"),
        (fields(sender=1 << 48), "sender must be"),
        (fields(start=END, end=START), "allocation range is empty or reversed"),
        (fields(end=(1 << 32) + 1), "allocation range end"),
        (fields(ring=b"not a ring"), "invalid ring encoding"),
        (fields(ring=seeded(5, [5], START, START + 256).to_bytes()), "ring's range differs"),
        (fields(ring=seeded(9, [9]).to_bytes()), "encoded by another peer"),
        (fields(paxos=[[5, 1, 0, 0, 0, []]]), "promise proposer must be"),
        (fields(paxos=[[5, 0, 0, 1, 5, []]]), "accept an empty value"),
        (fields(paxos=[[5, 0, 0, 0, 0, [6]]]), "value without an accepted proposal"),
        (fields(paxos=[[5, 0, 0, 0, 0, []], [5, 0, 0, 0, 0, []]]), "names a node twice"),
        (fields(nicknames={5: "x" * 65}), "nickname must be"),
        (fields(nicknames={5: "bad\nname"}), "nickname must be"),
        (fields(seeds=["a"]), "seed must be"),
        (fields(want_ring=1), "want_ring must be a boolean"),
    ],
)
def test_malformed_states_are_rejected_with_a_reason(payload: bytes, error: str):
    with pytest.raises(wire.WireError, match=error):
        wire.decode_state(payload)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "empty unicast"),
        (b"\x07" + msgpack.packb([1, 2]), "unknown unicast tag 7"),
        (b"\x00" + msgpack.packb([5, 5]), "requested range is empty"),
        (b"\x00" + msgpack.packb([5]), "space request has 1 fields"),
        (b"\x02" + msgpack.packb(["a", "b"]), "requested range start"),
        (b"\x01" + msgpack.packb([[], True]), "state has 0 fields"),
    ],
)
def test_malformed_unicasts_are_rejected_with_a_reason(payload: bytes, error: str):
    with pytest.raises(wire.WireError, match=error):
        wire.decode_unicast(payload)


@scenario()
async def test_garbage_reaching_the_allocator_changes_nothing_and_is_logged_once(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
):
    alloc = await cluster.start(0, init="consensus=1")
    mine = await alloc.allocate("c1")
    before = (ring_view(alloc), alloc.owned())
    src = cluster.name(1)
    for _ in range(3):
        assert alloc.on_gossip(b"\xc1 not msgpack") is None
        assert alloc.on_gossip_broadcast(src, fields(sender=int(src), ring=b"junk")) is None
        alloc.on_gossip_unicast(src, b"\x09")
        alloc.on_gossip_unicast(src, wire.encode_unicast(wire.SpaceRequest(0x0B000000, 0x0B000100)))
        # A broadcast whose body names another sender than the mesh says it came from.
        assert alloc.on_gossip_broadcast(src, fields(sender=0x0E0000000009)) is None
    assert (ring_view(alloc), alloc.owned()) == before
    assert alloc.report()["RejectedMessages"] == 15
    assert caplog.text.count("invalid IPAM gossip: not valid msgpack") == 1, "logged once, not per message"
    assert caplog.text.count("invalid ring encoding") == 1
    # A forged ring that gives our allocated range to another peer at a huge version: the ring
    # follows (it cannot tell a forgery from a takeover) but the address is disputed, not reissued.
    forged = Ring(START, END, int(src))
    forged.merge(alloc.ring)
    forged.transfer(cluster.name(0), int(src))
    alloc.on_gossip(wire.encode_state(state(sender=int(src), ring=forged)))
    assert alloc.report()["Disputed"] == [f"{mine.ip}/32"]
    assert alloc.lookup("c1") == [mine], "what we hold stays recorded"
    with pytest.raises(IpamError, match="owned by unreachable peers"):
        await alloc.allocate("c2", timeout=0.5)


@scenario()
async def test_garbage_over_a_real_connection_does_not_cut_it(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    victim = await cluster.start(0, init="consensus=1")
    await victim.allocate("c1")
    before = ring_view(victim)
    # A peer whose "ipam" channel is a rogue that sends whatever it likes.
    rogue_store = cluster.stores.setdefault(1, Store(cluster.tmp_path / "rogue"))
    rogue = Router(
        name=cluster.name(1),
        nickname="rogue",
        listen_host=cluster.ip(1),
        port=cluster.port,
        mesh_key=None,
        store=rogue_store,
        timings=cluster.routers[0].timings,
    )

    class Rogue:
        def on_gossip(self, payload: bytes) -> None:
            return None

        def on_gossip_broadcast(self, src: object, payload: bytes) -> None:
            return None

        def on_gossip_unicast(self, src: object, payload: bytes) -> None:
            return None

        def gossip(self) -> OpaqueGossipData:
            return OpaqueGossipData([b"\xde\xad\xbe\xef"])

    channel = rogue.new_gossip_channel(wire.CHANNEL, Rogue())
    await cluster.nursery.start(rogue.serve)
    await rogue.connect([cluster.addr(0)])
    await eventually(lambda: cluster.connected(0, 1), "the rogue connected")
    other = seeded(int(cluster.name(1)), [int(cluster.name(1))], 0x0B000000, 0x0B010000)
    for payload in (
        b"\x00" * 1000,
        fields(sender=int(cluster.name(1)), ring=b"junk"),
        wire.encode_state(wire.State(int(cluster.name(1)), 0x0B000000, 0x0B010000, ring=other)),
    ):
        channel.gossip_broadcast(payload)
        channel.gossip_unicast(cluster.name(0), payload)
    await eventually(
        lambda: victim.report()["RejectedMessages"] >= 4 and str(cluster.name(1)) in victim.report()["Refused"],
        "the bad messages to be handled, the last one (another range) among them",
    )
    assert cluster.connected(0, 1), "bad IPAM data must not cut the connection"
    assert ring_view(victim) == before
    assert victim.report()["Refused"][str(cluster.name(1))].startswith("Incompatible IP allocation ranges")
    assert await victim.allocate("c2") != await victim.allocate("c1"), "and it still allocates"
