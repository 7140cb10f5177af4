"""The Rust datapath between lab hosts: frames cross, encrypted or plain, and misbehaviour is refused.

Each scenario builds what the router will build on a real host: a `weave` bridge with the
datapath's TAP on it and a "container" (a namespace with `ethwe0`) attached, then pushes peers and
routes into the datapath the way the router does. Keys come from the real mesh handshake, run
in-process.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Container, Host, Lab, LabProcess, iperf3, wait_until
from weavenet._fastdp import DataKeys, Datapath, MeshHandshake, MeshKey, datapath_overlay_mtu

pytestmark = pytest.mark.lab(hosts=2)

PORT = 6783
TAP = "weave-dp"
BRIDGE = "weave"
CANARY = b"weavenet-canary-plaintext-0123456789"


def peer_id(host: Host) -> int:
    return 0x0A0000000000 + host.number


def overlay_ip(host: Host) -> str:
    return f"10.40.0.{host.number}"


def handshake(password: bytes = b"s3cret", *, other_password: bytes | None = None) -> tuple[DataKeys, DataKeys]:
    """Data keys of both ends of one connection, from the real mesh handshake."""
    key_i = MeshKey.from_password(password)
    key_r = key_i if other_password is None else MeshKey.from_password(other_password)
    initiator = MeshHandshake(key_i, initiator=True, intro=b"i", prologue=b"test")
    responder = MeshHandshake(key_r, initiator=False, intro=b"r", prologue=b"test")
    sides = [initiator, responder]
    inbox: list[list[bytes]] = [[], []]
    while not (initiator.is_complete and responder.is_complete):
        progressed = False
        for me in (0, 1):
            while (body := sides[me].write_message()) is not None:
                inbox[me ^ 1].append(body)
                progressed = True
        for me in (0, 1):
            if inbox[me]:
                sides[me].read_message(inbox[me].pop(0))
                progressed = True
        assert progressed, "handshake stalled"
    return initiator.finish()[1], responder.finish()[1]


@dataclass
class Node:
    host: Host
    datapath: Datapath
    container: Container


def open_node(
    host: Host, mtu: int, closing: list[Datapath] | None = None, *, container_mtu: int | None = None, **open_args: Any
) -> Node:
    """A bridge on `host`, the datapath's TAP on it and one container on it (`ethwe0`, overlay_ip).
    The datapath goes into `closing` as soon as it is open."""
    host.add_bridge(BRIDGE)
    datapath = host.call(lambda: Datapath.open(TAP, PORT, mtu, peer_id(host), **open_args))
    if closing is not None:
        closing.append(datapath)
    # The TAP takes any frame size: oversize packets must reach the datapath to be answered.
    host.set_link(TAP, master=BRIDGE, mtu=65000, up=True)
    container = host.add_container("c")
    host.add_veth_to(container, "vethc", "ethwe0", bridge=BRIDGE, mtu=container_mtu or mtu)
    container.add_address("ethwe0", f"{overlay_ip(host)}/24")
    return Node(host, datapath, container)


def build(
    lab: Lab,
    closing: list[Datapath],
    keys: tuple[DataKeys | None, DataKeys | None] = (None, None),
    *,
    container_mtu: int | None = None,
) -> list[Node]:
    """Two hosts with a bridge, the datapath's TAP on it and one container each, peered directly.
    Each datapath goes into `closing` as it opens, so a failure half-way still closes the first."""
    encrypted = keys[0] is not None
    mtu = datapath_overlay_mtu(lab.mtu, encrypted)
    nodes = [open_node(host, mtu, closing, container_mtu=container_mtu) for host in lab.hosts[:2]]
    for node, other, key in ((nodes[0], nodes[1], keys[0]), (nodes[1], nodes[0], keys[1])):
        node.datapath.set_peer(peer_id(other.host), other.host.address, PORT, key)
        node.datapath.set_routes({peer_id(other.host): peer_id(other.host)}, [peer_id(other.host)])
    return nodes


@pytest.fixture
def closing() -> Iterator[list[Datapath]]:
    """Datapaths to close at the end (their TAPs vanish with them)."""
    opened: list[Datapath] = []
    yield opened
    with contextlib.ExitStack() as stack:  # every one is closed even if closing another raises
        for datapath in opened:
            stack.callback(datapath.close)


def both_up(nodes: list[Node]) -> None:
    for node in nodes:
        other = peer_id(nodes[1].host if node is nodes[0] else nodes[0].host)
        wait_until(
            lambda node=node, other=other: node.datapath.stats()["peers"][other]["up"],
            timeout=10,
            message=f"{node.host.label} to see its peer up",
        )


def capture(host: Host, path: Path) -> LabProcess:
    """tcpdump of the underlay's data port, written to `path`."""
    process = host.start(
        [
            "tcpdump",
            "-i",
            host.interface,
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
            str(path),
            "udp",
            "port",
            str(PORT),
        ],
        name=f"tcpdump-{path.stem}",
    )
    # tcpdump writes the pcap header only once the capture is active: a non-empty file means it is.
    wait_until(lambda: path.exists() and path.stat().st_size > 0, timeout=10, message="tcpdump to start")
    return process


def udp_payloads(path: Path) -> list[tuple[str, bytes]]:
    """(source IP, UDP payload) of every IPv4/UDP packet in a pcap file (Ethernet link type)."""
    data = path.read_bytes()
    out = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from("<IIII", data, offset)
        if offset + 16 + caplen > len(data):
            break  # tcpdump is still writing this record
        packet = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if len(packet) < 42 or packet[12:14] != b"\x08\x00":
            continue
        ihl = (packet[14] & 0x0F) * 4
        if packet[23] != 17:
            continue
        source = socket.inet_ntoa(packet[26:30])
        out.append((source, packet[14 + ihl + 8 :]))
    return out


def tx_datagrams(node: Node, other: Node) -> int:
    return int(node.datapath.stats()["peers"][peer_id(other.host)]["tx_datagrams"])


def captured_from(pcap: Path, sender: Node, receiver: Node, sent_before: int) -> list[bytes]:
    """The sender's UDP payloads in the capture, once it holds every datagram the sender's datapath
    counted as sent to `receiver` since it counted `sent_before` (tcpdump writes asynchronously)."""
    sent = tx_datagrams(sender, receiver) - sent_before

    def payloads() -> list[bytes] | None:
        found = [payload for source, payload in udp_payloads(pcap) if source == sender.host.address]
        return found if len(found) >= sent else None

    return wait_until(payloads, timeout=5, message=f"the capture to hold the {sent} datagrams sent")


def send_canary(src: Container, dst: Container, dst_ip: str) -> bytes | None:
    """Send CANARY from src to dst over UDP; what dst received (None if nothing within 2 s)."""
    receiver = dst.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = src.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind((dst_ip, 9999))
        receiver.settimeout(2.0)
        sender.sendto(CANARY, (dst_ip, 9999))
        try:
            return receiver.recv(2048)
        except TimeoutError:
            return None
    finally:
        receiver.close()
        sender.close()


def test_plain_ping_crosses_and_is_counted(lab: Lab, closing: list[Datapath]) -> None:
    nodes = build(lab, closing)
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    both_up(nodes)
    stats = a.datapath.stats()
    peer = stats["peers"][peer_id(b.host)]
    assert peer["tx_datagrams"] > 0 and peer["rx_datagrams"] > 0 and not peer["encrypted"]
    assert stats["drops"]["auth"] == 0
    # The learned MACs were reported to the router.
    events = a.datapath.drain_events()
    assert ("peer_up", peer_id(b.host)) in events
    assert any(e[0] == "mac_learned" and e[2] == peer_id(b.host) for e in events)
    # And the plaintext is visible on the underlay in plain mode (this is what encryption hides).
    pcap = lab.workdir / "plain.pcap"
    dump = capture(b.host, pcap)
    sent_before = tx_datagrams(a, b)
    assert send_canary(a.container, b.container, overlay_ip(b.host)) == CANARY
    captured = captured_from(pcap, a, b, sent_before)
    dump.stop()
    assert any(CANARY in payload for payload in captured)


def test_encrypted_traffic_hides_plaintext_and_refuses_replays(lab: Lab, closing: list[Datapath]) -> None:
    nodes = build(lab, closing, handshake())
    a, b = nodes
    assert a.datapath.stats()["peers"][peer_id(b.host)]["encrypted"]
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    pcap = lab.workdir / "encrypted.pcap"
    dump = capture(b.host, pcap)
    sent_before = tx_datagrams(a, b)
    assert send_canary(a.container, b.container, overlay_ip(b.host)) == CANARY
    captured = captured_from(pcap, a, b, sent_before)
    dump.stop()
    assert captured, "the capture saw our datagrams"
    assert not any(CANARY in payload for payload in captured)

    # Replay everything captured from A to B: all dropped as replays, nothing delivered again.
    before = b.datapath.stats()
    receiver = b.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((overlay_ip(b.host), 9999))
    receiver.settimeout(1.0)
    replayer = a.host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for payload in captured:
            replayer.sendto(payload, (b.host.address, PORT))
        wait_until(
            lambda: b.datapath.stats()["drops"]["replay"] - before["drops"]["replay"] >= len(captured),
            timeout=5,
            message="replayed datagrams to be counted",
        )
        with pytest.raises(TimeoutError):
            receiver.recv(2048)
    finally:
        receiver.close()
        replayer.close()


def test_wrong_key_is_dropped_and_counted(lab: Lab, closing: list[Datapath]) -> None:
    # Each end holds keys from a different handshake: nothing may open.
    keys_a, _ = handshake()
    _, keys_b = handshake()
    nodes = build(lab, closing, (keys_a, keys_b))
    a, b = nodes
    assert not a.container.ping(overlay_ip(b.host), count=2, timeout=1)
    wait_until(lambda: b.datapath.stats()["drops"]["auth"] > 0, timeout=5, message="auth drops at B")
    assert b.datapath.stats()["tap_tx_frames"] == 0
    assert not b.datapath.stats()["peers"][peer_id(a.host)]["up"]


def test_df_ping_too_big_gets_frag_needed(lab: Lab, closing: list[Datapath]) -> None:
    # Containers keep a 1500 MTU; the overlay carries less, so the datapath must answer.
    nodes = build(lab, closing, handshake(), container_mtu=1500)
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    result = a.container.run(
        ["ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", overlay_ip(b.host)], check=False
    )
    mtu = datapath_overlay_mtu(lab.mtu, True)
    assert f"mtu = {mtu}" in result.stdout, result.stdout + result.stderr
    assert a.datapath.stats()["icmp_sent"] >= 1
    # The stack learned it: the next large ping is fragmented by the sender and goes through.
    assert (
        a.container.run(["ping", "-n", "-c", "1", "-W", "2", "-s", "1472", overlay_ip(b.host)], check=False).returncode
        == 0
    )


def reassemblies(host: Host) -> int:
    lines = host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    names, values = (line.split()[1:] for line in lines if line.startswith("Ip:"))
    return int(dict(zip(names, values, strict=True))["ReasmReqds"])


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_tcp_throughput_without_underlay_fragments(lab: Lab, closing: list[Datapath], encrypted: bool) -> None:
    nodes = build(lab, closing, handshake() if encrypted else (None, None), container_mtu=1500)
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    before = reassemblies(b.host), reassemblies(a.host)

    result = iperf3(b.container, a.container, overlay_ip(b.host), seconds=2)
    assert result.received_gbps > 0.05, result.describe()
    assert (reassemblies(b.host), reassemblies(a.host)) == before
    stats = a.datapath.stats()
    assert stats["segmented"] > 0, "the TAP handed over TSO super-frames"
    print(f"\n{'encrypted' if encrypted else 'plain'}: {result.describe()}; sender stats {stats}")


def build_line(lab: Lab, closing: list[Datapath], *, container_mtu: int | None = None) -> dict[str, Node]:
    """Three hosts A - B - C, encrypted, where A and C cannot reach each other on the underlay:
    routes send everything between them through B (as the router's routes would)."""
    a, b, c = lab.hosts
    lab.cut(a, c)
    mtu = datapath_overlay_mtu(lab.mtu, True)
    keys = {(x.label, y.label): handshake() for x, y in ((a, b), (b, c))}
    nodes = {host.label: open_node(host, mtu, closing, container_mtu=container_mtu) for host in (a, b, c)}
    da, db, dc = (nodes[h.label].datapath for h in (a, b, c))
    ia, ib, ic = (peer_id(h) for h in (a, b, c))
    da.set_peer(ib, b.address, PORT, keys[a.label, b.label][0])
    db.set_peer(ia, a.address, PORT, keys[a.label, b.label][1])
    db.set_peer(ic, c.address, PORT, keys[b.label, c.label][0])
    dc.set_peer(ib, b.address, PORT, keys[b.label, c.label][1])
    da.set_routes({ib: ib, ic: ib}, [ib])
    db.set_routes({ia: ia, ic: ic}, [ia, ic], {ia: [ic], ic: [ia]})
    dc.set_routes({ia: ib, ib: ib}, [ib])
    return nodes


@pytest.mark.lab(hosts=3)
def test_relay_and_flooding_across_three_hosts(lab: Lab, closing: list[Datapath]) -> None:
    """A and C cannot reach each other on the underlay; their frames (ARP broadcasts included)
    travel via B, which relays without delivering them locally except for broadcasts."""
    nodes = build_line(lab, closing)
    a, b, c = lab.hosts
    db, dc = nodes[b.label].datapath, nodes[c.label].datapath
    ia = peer_id(a)

    nodes[a.label].container.wait_reachable(overlay_ip(c), timeout=20)
    nodes[c.label].container.wait_reachable(overlay_ip(b), timeout=20)
    assert db.stats()["relayed"] > 0, "unicast between A and C went through B"
    assert db.stats()["flooded"] > 0, "A's ARP broadcast was passed on by B"
    # C learned A's container MAC as living behind A (the origin), not behind B (the relay).
    events = dc.drain_events()
    assert any(e[0] == "mac_learned" and e[2] == ia for e in events), events
    # A multicast datagram from A reaches both B and C.
    group = "239.1.2.3"
    receivers = []
    for host in (b, c):
        nodes[host.label].container.run(["ip", "route", "add", "224.0.0.0/4", "dev", "ethwe0"])
        sock = nodes[host.label].container.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 9998))
        membership = socket.inet_aton(group) + socket.inet_aton(overlay_ip(host))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.settimeout(3.0)
        receivers.append(sock)
    nodes[a.label].container.run(["ip", "route", "add", "224.0.0.0/4", "dev", "ethwe0"])
    sender = nodes[a.label].container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        sender.sendto(CANARY, (group, 9998))
        assert [r.recv(2048) for r in receivers] == [CANARY, CANARY]
    finally:
        sender.close()
        for r in receivers:
            r.close()


def test_path_mtu_is_discovered_and_enforced(lab: Lab, closing: list[Datapath]) -> None:
    """Configured for jumbo frames on a 1500 underlay: discovery finds what the path carries,
    reports it, and from then on too-big packets get ICMP answers instead of being lost."""
    jumbo = 9000
    encrypted = handshake()
    a, b = (open_node(host, jumbo, closing) for host in lab.hosts[:2])
    a.datapath.set_peer(peer_id(b.host), b.host.address, PORT, encrypted[0])
    b.datapath.set_peer(peer_id(a.host), a.host.address, PORT, encrypted[1])
    for node, other in ((a, b), (b, a)):
        node.datapath.set_routes({peer_id(other.host): peer_id(other.host)}, [peer_id(other.host)])
    expected = datapath_overlay_mtu(lab.mtu, True)
    seen: list[tuple] = []

    def discovered() -> bool:
        seen.extend(a.datapath.drain_events())
        return ("pmtu", peer_id(b.host), expected) in seen

    wait_until(discovered, timeout=20, message=f"PMTU discovery to report {expected}")
    assert a.datapath.stats()["peers"][peer_id(b.host)]["overlay_mtu"] == expected
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    result = a.container.run(
        ["ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", "3000", overlay_ip(b.host)], check=False
    )
    assert f"mtu = {expected}" in result.stdout, result.stdout + result.stderr
    before = reassemblies(b.host)

    assert iperf3(b.container, a.container, overlay_ip(b.host), seconds=1).received_gbps > 0.05
    assert reassemblies(b.host) == before


def test_garbage_datagrams_are_counted_not_delivered(lab: Lab, closing: list[Datapath]) -> None:
    nodes = build(lab, closing, handshake())
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    before = b.datapath.stats()
    junk = a.host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rng = random.Random(7)
        for size in (0, 1, 23, 24, 25, 60, 1400):
            junk.sendto(bytes(rng.randrange(256) for _ in range(size)), (b.host.address, PORT))
        # A well-formed header from a peer B does not know.
        header = bytes([1, 0, 0, 0]) + (0x0F0000000009).to_bytes(6, "big") + peer_id(b.host).to_bytes(6, "big")
        junk.sendto(header + bytes(8) + bytes([0, 14]) + bytes(14), (b.host.address, PORT))
    finally:
        junk.close()

    def counted() -> bool:
        drops = b.datapath.stats()["drops"]
        return sum(drops.values()) - sum(before["drops"].values()) >= 8

    wait_until(counted, timeout=5, message="junk to be counted as drops")
    assert b.datapath.stats()["drops"]["unknown_peer"] > before["drops"]["unknown_peer"]
    assert a.container.ping(overlay_ip(b.host))


def test_events_fd_wakes_a_trio_loop(lab: Lab, closing: list[Datapath]) -> None:
    import trio

    nodes = build(lab, closing)
    a, b = nodes

    async def wait_for_peer_up() -> list[tuple]:
        events: list[tuple] = []
        with trio.fail_after(10):
            while ("peer_up", peer_id(b.host)) not in events:
                await trio.lowlevel.wait_readable(a.datapath.events_fd())
                events += a.datapath.drain_events()
        return events

    assert ("peer_up", peer_id(b.host)) in trio.run(wait_for_peer_up)


def test_ipv6_underlay(lab: Lab, closing: list[Datapath]) -> None:
    """The underlay may be IPv6: the socket binds `::` and peers are IPv6 addresses."""
    keys = handshake()
    mtu = datapath_overlay_mtu(lab.mtu, True, ipv6_underlay=True)
    for host in lab.hosts[:2]:
        host.run(["ip", "-6", "addr", "add", f"fd00:251::{host.number}/64", "dev", host.interface, "nodad"])
    a, b = (open_node(host, mtu, closing, bind_addr="::") for host in lab.hosts[:2])
    a.datapath.set_peer(peer_id(b.host), f"fd00:251::{b.host.number}", PORT, keys[0])
    b.datapath.set_peer(peer_id(a.host), f"fd00:251::{a.host.number}", PORT, keys[1])
    for node, other in ((a, b), (b, a)):
        node.datapath.set_routes({peer_id(other.host): peer_id(other.host)}, [peer_id(other.host)])
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    assert a.datapath.stats()["peers"][peer_id(b.host)]["addr"] == f"[fd00:251::{b.host.number}]:{PORT}"

    assert iperf3(b.container, a.container, overlay_ip(b.host), seconds=1).received_gbps > 0.05


def test_setting_a_peer_again_keeps_its_session(lab: Lab, closing: list[Datapath]) -> None:
    """The router may push the same peer twice (address refresh): counters and keys carry on, so
    the other side's replay window does not start refusing us."""
    keys = handshake()
    nodes = build(lab, closing, keys)
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    a.datapath.set_peer(peer_id(b.host), b.host.address, PORT, keys[0])
    b.datapath.set_peer(peer_id(a.host), a.host.address, PORT, keys[1])
    assert a.container.ping(overlay_ip(b.host), count=3, timeout=1)
    assert b.datapath.stats()["drops"]["replay"] == 0
    assert a.datapath.stats()["peers"][peer_id(b.host)]["up"]
    # New keys (a new connection) replace the session on both ends.
    fresh = handshake()
    a.datapath.set_peer(peer_id(b.host), b.host.address, PORT, fresh[0])
    b.datapath.set_peer(peer_id(a.host), a.host.address, PORT, fresh[1])
    a.container.wait_reachable(overlay_ip(b.host), timeout=10)


def test_udp_gso_super_datagrams_are_segmented(lab: Lab, closing: list[Datapath]) -> None:
    """A container sending with UDP GSO hands the TAP one super-datagram (USO offload, where the
    kernel has it); the datapath cuts it into the datagrams the receiver expects."""
    nodes = build(lab, closing, handshake())
    a, b = nodes
    a.container.wait_reachable(overlay_ip(b.host), timeout=15)
    receiver = b.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = a.container.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind((overlay_ip(b.host), 9997))
        receiver.settimeout(3.0)
        sender.setsockopt(socket.IPPROTO_UDP, 103, 1000)  # UDP_SEGMENT: 1000-byte datagrams
        payload = bytes(range(256)) * 20  # 5120 bytes -> 6 datagrams
        sender.sendto(payload, (overlay_ip(b.host), 9997))
        got = [receiver.recv(4096) for _ in range(6)]
    finally:
        receiver.close()
        sender.close()
    assert b"".join(got) == payload
    assert [len(g) for g in got] == [1000] * 5 + [120]
    if a.datapath.tap_offloads & 0x20:  # TUN_F_USO4: the kernel handed us the super-datagram
        assert a.datapath.stats()["segmented"] >= 1


def test_liveness_follows_the_underlay(lab: Lab, closing: list[Datapath]) -> None:
    """Heartbeats keep a peer up; cut the underlay and it goes down, heal it and it comes back."""
    nodes = build(lab, closing, handshake())
    a, b = nodes
    both_up(nodes)
    assert a.datapath.stats()["peers"][peer_id(b.host)]["rtt_us"] > 0
    seen: list[tuple] = []

    def saw(event: tuple) -> Callable[[], bool]:
        def check() -> bool:
            seen.extend(a.datapath.drain_events())
            return event in seen

        return check

    lab.cut(a.host, b.host)
    wait_until(saw(("peer_down", peer_id(b.host))), timeout=20, message="B to be reported down")
    lab.heal(a.host, b.host)
    seen.clear()
    wait_until(saw(("peer_up", peer_id(b.host))), timeout=10, message="B to be reported up again")
    a.container.wait_reachable(overlay_ip(b.host), timeout=10)


@pytest.mark.lab(hosts=3)
def test_relay_with_a_narrower_next_leg_answers_too_big(lab: Lab, closing: list[Datapath]) -> None:
    """B -> C carries less than A -> B (C's underlay link has a smaller MTU). B's path-MTU
    discovery finds it, and a DF packet from A's container that fits A -> B but not B -> C gets
    the ICMP answer from B, through the overlay, as from a router on the path."""
    a, b, c = lab.hosts
    c.set_link(c.interface, mtu=1300)
    nodes = build_line(lab, closing, container_mtu=1500)
    db = nodes[b.label].datapath
    wide = datapath_overlay_mtu(lab.mtu, True)
    found: list[int] = []

    def discovered() -> bool:
        found.extend(e[2] for e in db.drain_events() if e[0] == "pmtu" and e[1] == peer_id(c))
        return bool(found) and found[-1] < wide

    wait_until(discovered, timeout=30, message="B to discover the narrower path towards C")
    narrow = found[-1]
    # About what a 1300-byte underlay carries (veth accepts a few bytes of VLAN slack on top).
    assert datapath_overlay_mtu(1300, True) <= narrow <= datapath_overlay_mtu(1310, True)
    nodes[a.label].container.wait_reachable(overlay_ip(c), timeout=20)
    result = nodes[a.label].container.run(
        ["ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1300", overlay_ip(c)], check=False
    )
    assert f"mtu = {narrow}" in result.stdout, result.stdout + result.stderr
    assert db.stats()["icmp_sent"] >= 1
    # A still learns C's container MAC behind C (the answer came "from" C), so traffic goes on.
    assert nodes[a.label].container.ping(overlay_ip(c), count=2)


def test_endpoint_follows_authenticated_datagrams(lab: Lab, closing: list[Datapath]) -> None:
    """A was told a wrong port for B (as behind a NAT that rebinds): B's authenticated datagrams
    arriving from its real address move A's endpoint for B there, and A reports it."""
    keys = handshake()
    nodes = build(lab, closing, keys)
    a, b = nodes
    a.datapath.set_peer(peer_id(b.host), b.host.address, PORT + 1, keys[0])  # nobody listens there
    real = f"{b.host.address}:{PORT}"
    seen: list[tuple] = []

    def moved() -> bool:
        seen.extend(a.datapath.drain_events())
        return ("peer_endpoint", peer_id(b.host), real) in seen

    wait_until(moved, timeout=10, message="A to follow B to its real address")
    assert a.datapath.stats()["peers"][peer_id(b.host)]["addr"] == real
    a.container.wait_reachable(overlay_ip(b.host), timeout=10)
