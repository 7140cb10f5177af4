"""Several routers in one trio run, each on its own loopback address, talking real TCP.

Scenarios a user would recognise: peers given one seed each find each other; a line of peers
routes through the middle; forget and connect --replace; right and wrong passwords; two peers
dialling each other at once; a restarted router reconnecting from its stored targets; and
hostile bytes against the mesh port that must not disturb the real peers.
"""

from __future__ import annotations

import functools
import logging
import random
import struct
from collections.abc import Callable
from ipaddress import IPv4Network

import trio

from tests.mesh_harness import FAST, Mesh, eventually, scenario
from weavenet._fastdp import MeshKey
from weavenet.mesh import status_text, wire
from weavenet.mesh.gossip import GossipData, OpaqueGossipData
from weavenet.mesh.handshake import ChannelClosed, handshake
from weavenet.mesh.handshake import ProtocolError as FramingError
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.router import MeshTimings, Router
from weavenet.mesh.routes import Routes
from weavenet.store import Store


def connected(router: Router) -> set[PeerName]:
    return set(router.connected_peers())


def states(router: Router) -> list[tuple[str, str, str]]:
    return [(c["Address"], c["State"], c["Info"]) for c in router.report()["Connections"]]


@functools.cache
def mesh_key(password: str) -> MeshKey:
    return MeshKey.from_password(password.encode())


# ------------------------------------------------------------------------------------------------


@scenario()
async def test_five_routers_each_given_one_seed_converge_to_a_full_mesh(mesh: Mesh) -> None:
    for i in range(5):
        await mesh.start(i)
    start = trio.current_time()
    for i in range(5):
        await mesh[i].connect([mesh.addr((i + 1) % 5)])
    everyone = {mesh.name(i) for i in range(5)}
    await eventually(lambda: all(connected(mesh[i]) == everyone - {mesh.name(i)} for i in range(5)), "a full mesh of 5")
    await eventually(lambda: all(set(mesh[i].known_peers()) == everyone for i in range(5)), "the same peer set")
    took = trio.current_time() - start
    logging.getLogger("test").warning("5-router full mesh converged in %.3f s", took)
    assert took < 5
    # Every router holds every peer's latest record, and routes everywhere go direct.
    await eventually(
        lambda: len({tuple(map(str, mesh[i].topology.records())) for i in range(5)}) == 1, "identical topologies"
    )
    for i in range(5):
        assert mesh[i].routes.unicast == {p: p for p in everyone - {mesh.name(i)}}
    # Dials that raced and lost a tie-break show as failed only until the maker sees the link.
    await eventually(lambda: {c["State"] for c in mesh[0].report()["Connections"]} == {"established"}, "settled")
    report = mesh[0].report()
    assert len(report["Peers"]) == 5
    text = status_text.format_status(report)
    assert "Connections: 4 (4 established)" in text and "Peers: 5 (with 20 established connections)" in text
    metrics = {(n, tuple(sorted(labels.items()))): v for n, _, labels, v in mesh[0].metrics()}
    assert metrics[("weave_connections", (("encryption", ""), ("state", "established"), ("type", "")))] == 4
    assert metrics[("weave_peers", ())] == 5
    assert metrics[("weave_gossip_messages_total", (("direction", "in"), ("kind", "gossip")))] > 0


@scenario()
async def test_a_line_of_routers_routes_and_gossips_through_the_middle(mesh: Mesh) -> None:
    ends: dict[int, Recorder] = {}
    for i in range(3):
        router = await mesh.start(i, discovery=False)
        ends[i] = Recorder()
        router.new_gossip_channel("test", ends[i])
    pushed: list[Routes] = []
    mesh[0].subscribe_routes(pushed.append)  # what the datapath will do
    await mesh[1].connect([mesh.addr(0), mesh.addr(2)])
    a, b, c = mesh.name(0), mesh.name(1), mesh.name(2)
    await eventually(lambda: mesh[0].routes.unicast.get(c) == b and mesh[2].routes.unicast.get(a) == b, "line routes")
    await eventually(lambda: bool(pushed) and pushed[-1].unicast == {b: b, c: b}, "routes pushed to subscribers")
    assert connected(mesh[0]) == {b}, "no discovery: A never dials C"
    assert mesh[1].routes.broadcast(a) == (c,)
    channel = mesh[0].new_gossip_channel("unicast-test", ends[0])
    mesh[2].new_gossip_channel("unicast-test", ends[2])
    channel.gossip_unicast(c, b"hello C")
    await eventually(lambda: ends[2].unicasts == [(a, b"hello C")], "unicast across the line")
    mesh[0].new_gossip_channel("bcast", ends[0]).gossip_broadcast(b"to all")
    mesh[1].new_gossip_channel("bcast", ends[1])
    mesh[2].new_gossip_channel("bcast", ends[2])
    await eventually(lambda: (a, b"to all") in ends[1].broadcasts and (a, b"to all") in ends[2].broadcasts, "broadcast")
    peers_text = status_text.format_peers(mesh[1].report())
    assert f"-> {mesh.addr(0)}" in peers_text and "established" in peers_text


class Recorder:
    def __init__(self) -> None:
        self.unicasts: list[tuple[PeerName, bytes]] = []
        self.broadcasts: list[tuple[PeerName, bytes]] = []

    def on_gossip(self, payload: bytes) -> GossipData | None:
        return None

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        self.broadcasts.append((src, payload))
        return OpaqueGossipData([payload])

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        self.unicasts.append((src, payload))

    def gossip(self) -> GossipData | None:
        return None


@scenario()
async def test_forget_and_connect_replace(mesh: Mesh) -> None:
    for i in range(3):
        await mesh.start(i, discovery=False)
    errors = await mesh[0].connect([mesh.addr(1), "not a peer!"])
    assert errors and "not a peer!" in errors[0], "nothing applied when one peer is bad"
    assert await mesh[0].connect([mesh.addr(1)]) == []
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "A connected to B")
    assert mesh[0].report()["Targets"] == [mesh.addr(1)]
    await mesh[0].connect([mesh.addr(2)], replace=True)
    assert mesh[0].report()["Targets"] == [mesh.addr(2)]
    assert mesh.stores[0].get_json("targets") == [mesh.addr(2)]
    await eventually(lambda: mesh.name(2) in connected(mesh[0]), "A connected to C after replace")
    mesh[0].forget([mesh.addr(2)])
    assert mesh[0].report()["Targets"] == [] and mesh.stores[0].get_json("targets") == []
    assert status_text.format_targets(mesh[0].report()) == ""


@scenario()
async def test_right_password_connects_encrypted_wrong_one_is_a_password_mismatch(mesh: Mesh) -> None:
    right, wrong = mesh_key("correct horse battery staple"), mesh_key("wrong password")
    await mesh.start(0, mesh_key=right)
    await mesh.start(1, mesh_key=right)
    await mesh.start(2, mesh_key=wrong)
    await mesh[0].connect([mesh.addr(1), mesh.addr(2)])
    await mesh[2].connect([mesh.addr(0)])
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "A-B connected")

    def mismatch_on(i: int, address: str) -> bool:
        return any(a == address and s == "failed" and "password mismatch" in info for a, s, info in states(mesh[i]))

    await eventually(lambda: mismatch_on(0, mesh.addr(2)) and mismatch_on(2, mesh.addr(0)), "password mismatch")
    assert connected(mesh[2]) == set()
    report = mesh[0].report()
    assert report["Encryption"] is True
    [ab] = [c for c in report["Connections"] if c["State"] == "established"]
    assert ab["Info"].startswith("encrypted ") and ab["Attrs"] == {"encrypted": True}
    text = status_text.format_connections(report)
    assert f"-> {mesh.addr(1):<21} established encrypted" in text
    assert "password mismatch, retry:" in text
    # The failing peer keeps serving: B can still reach A, and C is still up for the right key.
    assert mesh[0].listening and mesh[2].listening
    await mesh.start(3, mesh_key=wrong)
    await mesh[3].connect([mesh.addr(2)])
    await eventually(lambda: connected(mesh[2]) == {mesh.name(3)}, "C still accepts its own password")
    assert "Encryption: disabled" not in status_text.format_status(report)


@scenario()
async def test_encryption_disabled_is_shown(mesh: Mesh) -> None:
    await mesh.start(0)
    assert "     Encryption: disabled" in status_text.format_status(mesh[0].report())


def one_shared_link(mesh: Mesh) -> bool:
    """Routers 0 and 1 each hold one established connection, and it is the same TCP connection."""
    a = mesh[0].connection_to(mesh.name(1))
    b = mesh[1].connection_to(mesh.name(0))
    if a is None or b is None or a.uid != b.uid or a.outbound == b.outbound:
        return False
    return all([c["State"] for c in mesh[i].report()["Connections"]].count("established") == 1 for i in range(2))


async def holds_for(check: Callable[[], bool], what: str, duration: float) -> None:
    """Fail as soon as `check()` stops holding within the next `duration` seconds."""
    with trio.move_on_after(duration):
        while True:
            assert check(), f"no longer holds: {what}"
            await trio.sleep(0.01)


@scenario()
async def test_simultaneous_connects_leave_exactly_one_connection(mesh: Mesh) -> None:
    for i in range(2):
        await mesh.start(i, discovery=False)
    for _ in range(3):
        # Both dial at the same moment, again and again: each time exactly one link survives.
        await mesh[0].connect([mesh.addr(1)])
        await mesh[1].connect([mesh.addr(0)])
        # The tie-break closes the losing dial asynchronously: wait for the one link both ends keep.
        await eventually(lambda: one_shared_link(mesh), "both ends on one connection (same uid, opposite directions)")
        a = mesh[0].connection_to(mesh.name(1))
        assert a is not None
        # And it stays the only one: no late duplicate replaces it or shows up beside it.
        await holds_for(
            functools.partial(lambda kept: mesh[0].connection_to(mesh.name(1)) is kept and one_shared_link(mesh), a),
            "the same single link",
            FAST.heartbeat,
        )
        a.shutdown("test: drop the link")
        await eventually(functools.partial(lambda old: mesh[0].connection_to(mesh.name(1)) is not old, a), "link gone")


@scenario()
async def test_a_restarted_router_reconnects_from_its_stored_targets(mesh: Mesh) -> None:
    await mesh.start(0)
    await mesh.start(1)
    await mesh[1].connect([mesh.addr(0)])
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "connected")
    old_uid = mesh[1].uid
    mesh.stop(1)
    await eventually(lambda: connected(mesh[0]) == set(), "A notices B has gone")
    restarted = await mesh.start(1)  # same store, same name; nobody calls connect()
    assert restarted.report()["Targets"] == [mesh.addr(0)]
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "B reconnects by itself")
    await eventually(lambda: mesh[0].topology.peers[mesh.name(1)].uid == restarted.uid != old_uid, "new incarnation")


@scenario()
async def test_a_stale_record_of_a_restarted_peer_is_outbid(mesh: Mesh) -> None:
    # B's first run gossips a high version; after a restart B hears that old record and must win.
    for i in range(3):
        await mesh.start(i)
    await mesh[1].connect([mesh.addr(0)])
    await mesh[2].connect([mesh.addr(0)])
    await eventually(lambda: len(connected(mesh[0])) == 2, "A has B and C")
    for _ in range(5):  # churn to push B's version up
        conn = mesh[1].connection_to(mesh.name(0))
        assert conn is not None
        conn.shutdown("test churn")
        await eventually(
            functools.partial(lambda old: mesh[1].connection_to(mesh.name(0)) not in (None, old), conn), "redial", 10
        )
    await eventually(lambda: mesh.name(1) in connected(mesh[2]), "C knows B")
    mesh.stop(1)
    restarted = await mesh.start(1)
    await eventually(
        lambda: all(
            mesh[i].topology.peers.get(mesh.name(1)) is not None
            and mesh[i].topology.peers[mesh.name(1)].uid == restarted.uid
            for i in (0, 2)
        ),
        "everyone holds the new incarnation's record",
    )


# -- hostile input ---------------------------------------------------------------------------------


async def send_and_wait_close(address: tuple[str, int], data: bytes, *, linger: float = 5.0) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        try:
            await stream.send_all(data)
            with trio.move_on_after(linger):
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@scenario(timeout=30)
async def test_hostile_bytes_against_the_mesh_port_drop_only_that_connection(mesh: Mesh) -> None:
    timings = MeshTimings.fast()
    await mesh.start(0, timings=timings)
    await mesh.start(1, timings=timings)
    await mesh[1].connect([mesh.addr(0)])
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "real peers connected")
    target = (mesh.ip(0), mesh.port)
    header = b"weavenet\x01\x01\x00"

    async def slow_loris() -> None:
        stream = await trio.open_tcp_stream(*target)
        async with stream:
            try:
                for byte in header:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def after_handshake(n: int, payload: bytes) -> None:
        stream = await trio.open_tcp_stream(*target)
        intro = wire.Intro(PeerName(0x0BAD00000000 + n), f"intruder{n}", uid=1, conn_id=2, trusted=False)
        channel = await handshake(stream, outbound=True, intro=wire.encode_intro(intro), mesh_key=None)
        async with channel:
            if payload.startswith(b"RAW"):
                await stream.send_all(payload[3:])
            else:
                await channel.send(payload)
            with trio.move_on_after(3):
                try:
                    while True:
                        await channel.receive()
                except (ChannelClosed, FramingError):
                    return  # the router closing on us is the expected outcome

    async with trio.open_nursery() as attackers:
        attackers.start_soon(send_and_wait_close, target, random.randbytes(4096))
        attackers.start_soon(send_and_wait_close, target, header + random.randbytes(64))
        attackers.start_soon(send_and_wait_close, target, header + struct.pack(">I", 2**31))
        attackers.start_soon(slow_loris)
        attackers.start_soon(after_handshake, 1, b"\x04garbage after a good handshake")
        attackers.start_soon(after_handshake, 2, b"RAW" + struct.pack(">I", 2**31))
        attackers.start_soon(after_handshake, 3, wire.encode_message(wire.Gossip("topology", PeerName(5), b"x")))
        attackers.start_soon(after_handshake, 4, b"\x63unknown tag")
    # The real peers never noticed.
    assert connected(mesh[0]) == {mesh.name(1)} and connected(mesh[1]) == {mesh.name(0)}
    report = mesh[0].report()
    assert [c["State"] for c in report["Connections"]] == ["established"]
    assert {p["Name"] for p in report["Peers"]} == {str(mesh.name(0)), str(mesh.name(1))}, "intruder GC'd"
    # Each intruder left one line saying why it was dropped.
    log = mesh.caplog.text
    for reason in (
        "handshake failed: not a weavenet peer",  # random bytes
        "handshake failed: handshake message too large",  # header, then a huge (or random) length
        "handshake failed: handshake timed out",  # slow loris
        "(intruder1)] connection deleted: protocol error: gossip",
        "(intruder2)] connection deleted: protocol error: message too large",
        "(intruder3)] connection deleted: protocol error: gossip claims to come from",
        "(intruder4)] connection deleted: protocol error: unknown message tag 99",
    ):
        assert reason in log, f"no log line for {reason!r}"


# -- limits, trust and identity ---------------------------------------------------------------------


@scenario()
async def test_conn_limit_applies_to_accepting(mesh: Mesh) -> None:
    await mesh.start(0, conn_limit=1, discovery=False)
    for i in (1, 2):
        await mesh.start(i, discovery=False)
    await mesh[1].connect([mesh.addr(0)])
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "first peer admitted")
    await mesh[2].connect([mesh.addr(0)])
    await eventually(lambda: any(s == "failed" for _, s, _ in states(mesh[2])), "second peer turned away")
    assert connected(mesh[0]) == {mesh.name(1)}
    assert "connection limit (1) reached" in mesh.caplog.text


@scenario()
async def test_trusted_subnets_turn_off_datapath_encryption_only_when_both_trust(mesh: Mesh) -> None:
    key = mesh_key("correct horse battery staple")
    loopback = [IPv4Network("127.0.0.0/8")]
    await mesh.start(0, mesh_key=key, trusted_subnets=loopback)
    await mesh.start(1, mesh_key=key, trusted_subnets=loopback)
    await mesh.start(2, mesh_key=key)
    await mesh[0].connect([mesh.addr(1), mesh.addr(2)])
    await eventually(lambda: len(connected(mesh[0])) == 2, "both connected")
    info = {c["Address"]: c["Info"] for c in mesh[0].report()["Connections"]}
    assert info[mesh.addr(1)].startswith("unencrypted ")
    assert info[mesh.addr(2)].startswith("encrypted "), "C does not trust A, so their link stays encrypted"
    assert mesh[0].connection_to(mesh.name(1)).encrypted, "the control channel is always encrypted with a password"
    assert mesh[0].report()["TrustedSubnets"] == ["127.0.0.0/8"]


@scenario()
async def test_connecting_to_ourselves_is_reported_and_never_retried(mesh: Mesh) -> None:
    await mesh.start(0)
    await mesh[0].connect([mesh.addr(0)])
    await eventually(
        lambda: states(mesh[0]) == [(mesh.addr(0), "failed", "cannot connect to ourself, retry: never")], "self"
    )
    await trio.sleep(0.5)
    assert mesh.caplog.text.count(f"->[{mesh.addr(0)}] attempting connection") == 1


@scenario()
async def test_two_routers_with_one_name_report_a_collision(mesh: Mesh) -> None:
    await mesh.start(0)
    twin = Router(
        name=mesh.name(0),
        nickname="twin",
        listen_host=mesh.ip(1),
        port=mesh.port,
        mesh_key=None,
        store=Store(mesh.tmp_path / "twin"),
        timings=FAST,
    )
    await mesh.nursery.start(twin.serve)
    await twin.connect([mesh.addr(0)])
    await eventually(lambda: any("peer name collision" in info for _, _, info in states(twin)), "collision")
    assert connected(twin) == set() and connected(mesh[0]) == set()


class Counter:
    """A gossiper whose state is one number per peer; merging keeps the maximum."""

    def __init__(self) -> None:
        self.state: dict[str, int] = {}

    def _merge(self, payload: bytes) -> dict[str, int]:
        new = {}
        for item in payload.decode().split(","):
            if item:
                key, value = item.split("=")
                if int(value) > self.state.get(key, -1):
                    new[key] = self.state[key] = int(value)
        return new

    def on_gossip(self, payload: bytes) -> GossipData | None:
        new = self._merge(payload)
        return OpaqueGossipData([",".join(f"{k}={v}" for k, v in new.items()).encode()]) if new else None

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        return self.on_gossip(payload)

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        self._merge(payload)

    def gossip(self) -> GossipData | None:
        return OpaqueGossipData([",".join(f"{k}={v}" for k, v in self.state.items()).encode()])


@scenario()
async def test_anti_entropy_spreads_state_nobody_announced(mesh: Mesh) -> None:
    counters = {}
    for i in range(3):
        router = await mesh.start(i, discovery=False)
        counters[i] = Counter()
        router.new_gossip_channel("counter", counters[i])
    await mesh[1].connect([mesh.addr(0), mesh.addr(2)])
    await eventually(lambda: len(connected(mesh[1])) == 2, "line up")
    counters[0].state["a"] = 7  # changed locally without telling anyone
    await eventually(lambda: counters[2].state.get("a") == 7, "periodic gossip reached the far end", timeout=5)


class Buggy:
    """A subsystem with a bug: it crashes on any gossip it receives."""

    def on_gossip(self, payload: bytes) -> GossipData | None:
        raise KeyError("bug")

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        raise KeyError("bug")

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        raise KeyError("bug")

    def gossip(self) -> GossipData | None:
        return None


@scenario()
async def test_a_subsystem_bug_closes_that_connection_not_the_router(mesh: Mesh) -> None:
    await mesh.start(0, discovery=False)
    await mesh.start(1, discovery=False)
    mesh[0].new_gossip_channel("buggy", Buggy())
    sender = mesh[1].new_gossip_channel("buggy", Buggy())
    await mesh[1].connect([mesh.addr(0)])
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "connected")
    sender.gossip_neighbourhood(b"boom")
    await eventually(lambda: "internal error handling a Gossip message" in mesh.caplog.text, "bug contained")
    assert "KeyError: 'bug'" in mesh.caplog.text, "the traceback is logged for the bug report"
    assert mesh[0].listening
    await eventually(lambda: connected(mesh[0]) == {mesh.name(1)}, "B redials and the link is back")
