"""The kernel fast path with real routers in lab hosts: which path each peer takes, and why.

Plain direct peers carry container traffic through the kernel VXLAN port (`fastdp`); a blocked
kernel port, a password, a relay, --no-fastdp or a taken port keep peers on the Rust datapath
(`sleeve`) with the reason shown; floods arrive once; a killed router leaves nothing stale; strangers'
VXLAN datagrams are dropped and counted. Everything is real: routers, namespaces, packets, captures.
"""

from __future__ import annotations

import itertools
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from tests import captures
from tests.lab import Container, Host, Lab, LabProcess, iperf3, wait_until
from tests.routers import LabRouter, full_mesh
from tests.test_overlay_lab import attach, pings, start_mesh
from weavenet.net import vxlan
from weavenet.net.kernel_path import HEARTBEAT_TIMEOUT

KERNEL_PORT = 6784
DATA_PORT = 6783
IPERF_PORT = (5201).to_bytes(2, "big")


# --- reading what a router says about its paths ---


def paths(router: LabRouter) -> dict[str, tuple[str, str | None]]:
    """Peer nickname → (path, why not fastdp) for each of the router's connections."""
    out = {}
    for conn in router.connections():
        attrs = conn.get("Attrs") or {}
        nick = re.search(r"\((\w+)\)", conn["Info"])
        if nick and "name" in attrs:
            out[nick.group(1)] = (str(attrs["name"]), attrs.get("fallback"))
    return out


def all_on(routers: list[LabRouter], path: str) -> bool:
    expected = {r.host.label for r in routers}
    return all(
        set(paths(r)) == expected - {r.host.label} and {p for p, _ in paths(r).values()} == {path} for r in routers
    )


def wait_all_on(routers: list[LabRouter], path: str, timeout: float = 15) -> None:
    wait_until(
        lambda: all_on(routers, path),
        timeout=timeout,
        message=f"every connection on {path} (now {[paths(r) for r in routers]})",
    )


def metric(router: LabRouter, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in router.metrics().splitlines():
        if line.startswith(f"{name}{{{want}}} " if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in {router}'s metrics")


def mac_of(container: Container, ifname: str = "ethwe0") -> str:
    out = container.run(["ip", "-o", "link", "show", ifname]).stdout
    match = re.search(r"link/ether ([0-9a-f:]{17})", out)
    assert match, out
    return match.group(1)


def fdb_lines(host: Host, port: int = KERNEL_PORT) -> list[str]:
    return host.run(["bridge", "fdb", "show", "dev", vxlan.device_name(port)], check=False).stdout.splitlines()


def local_macs(port: int = KERNEL_PORT) -> set[str]:
    """The MACs on this namespace's bridge, as the router reads them (run with Host.call)."""
    with IPRoute() as ipr:
        return vxlan.local_macs(ipr, {"weave-dp", vxlan.device_name(port)})


def kernel_rules(host: Host) -> tuple[list[str], list[str]]:
    """(our chain's rules, INPUT's jumps to it)."""
    chain = host.run(["iptables", "-w", "5", "-S", "WEAVENET-KERNEL"], check=False).stdout.splitlines()
    jumps = [r for r in host.run(["iptables", "-w", "5", "-S", "INPUT"]).stdout.splitlines() if "WEAVENET-KERNEL" in r]
    return [r for r in chain if r.startswith("-A")], jumps


# --- the scenarios ---


@pytest.mark.lab(hosts=3)
def test_plain_peers_carry_container_traffic_through_the_kernel(lab: Lab) -> None:
    routers = start_mesh(lab)
    attached = [attach(router) for router in routers]
    for (src, _), (_, dst) in itertools.permutations(attached, 2):
        wait_until(lambda src=src, dst=dst: pings(src, dst), timeout=20, message=f"{src} to reach {dst}")
    wait_all_on(routers, "fastdp")
    status = routers[0].cli("status", "connections")
    assert status.count(" fastdp ") == 2 and "sleeve" not in status, status
    summary = routers[0].cli("status")
    assert "FastPath: kernel VXLAN on UDP 6784 (vxlan-6784), peers: 2 fastdp" in summary, summary

    (c1, _), (c2, ip2), _ = attached
    h2 = lab.hosts[1]
    pcap = lab.workdir / "underlay.pcap"
    dump = captures.capture(h2, h2.interface, pcap, ["udp"])
    result = iperf3(c2, c1, ip2, seconds=2)
    captures.stop_capture(dump)
    assert result.received_gbps > 0.1, result.describe()
    seen = captures.datagrams(pcap)
    kernel = [d for d in seen if d.dport == KERNEL_PORT and d.destination == h2.address]
    inner = [found for d in kernel if (found := captures.vxlan_inner(d.payload)) is not None]
    carrying_iperf = [frame for _, frame in inner if IPERF_PORT in frame[34:38]]  # inner TCP ports
    assert len(kernel) > 1000 and carrying_iperf, f"{len(kernel)} VXLAN datagrams, {len(carrying_iperf)} of iperf3's"
    assert {vni for vni, _ in inner} == {vxlan.VNI}
    big_on_datapath = [d for d in seen if DATA_PORT in (d.sport, d.dport) and len(d.payload) > 300]
    assert not big_on_datapath, f"{len(big_on_datapath)} large datagrams on UDP {DATA_PORT}: TCP payload on sleeve"
    out = metric(routers[0], "weavenet_path_frames_total", path="fastdp", direction="out")
    assert out > 1000, f"fastdp frames out: {out}"


@pytest.mark.lab(hosts=2)
def test_a_blocked_kernel_port_moves_a_running_stream_to_sleeve_and_back(lab: Lab) -> None:
    routers = start_mesh(lab)
    (c1, _), (c2, ip2) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2), timeout=20, message="the containers to reach each other")
    wait_all_on(routers, "fastdp")
    h1, h2 = lab.hosts
    outcome: dict[str, Any] = {}

    def stream() -> None:
        try:
            outcome["result"] = iperf3(c2, c1, ip2, seconds=14, bitrate="200M")
        except Exception as error:  # reported by the main thread
            outcome["error"] = error

    runner = threading.Thread(target=stream, name="iperf3")
    runner.start()
    try:
        fastdp_out = metric(routers[0], "weavenet_path_bytes_total", path="fastdp", direction="out")
        wait_until(
            lambda: metric(routers[0], "weavenet_path_bytes_total", path="fastdp", direction="out") > fastdp_out + 2e7,
            timeout=15,
            message="the stream to flow on fastdp first",
        )
        sleeve_in = metric(routers[1], "weavenet_path_bytes_total", path="sleeve", direction="in")
        lab.block_udp(h1, h2, KERNEL_PORT)
        blocked_at = time.monotonic()
        wait_until(lambda: {p for p, _ in paths(routers[0]).values()} == {"sleeve"}, timeout=5, interval=0.05,
                   message="h1 to leave fastdp")  # fmt: skip
        moved_in = time.monotonic() - blocked_at
        assert moved_in <= 2.0, f"took {moved_in:.2f}s to move to sleeve (HEARTBEAT_TIMEOUT {HEARTBEAT_TIMEOUT}s)"
        wait_until(
            lambda: paths(routers[1]).get("h1", ("", ""))[0] == "sleeve", timeout=2, message="h2 to leave fastdp"
        )
        wait_until(
            lambda: metric(routers[1], "weavenet_path_bytes_total", path="sleeve", direction="in") > sleeve_in + 2e7,
            timeout=10,
            message="the stream to arrive through the Rust datapath",
        )
        why = routers[0].cli("status", "connections")
        assert re.search(r"sleeve .*\(kernel heartbeat timed out \d+ s ago\)", why), why
        assert metric(routers[0], "weavenet_kernel_fallbacks_total", reason="heartbeat") >= 1
    finally:
        runner.join(timeout=60)
    assert "error" not in outcome, f"the stream broke: {outcome.get('error')}"
    assert outcome["result"].received_bytes > 0, outcome["result"].describe()
    print(f"\nmoved to sleeve {moved_in:.2f}s after the block; stream: {outcome['result'].describe()}")
    lab.unblock_udp(h1, h2, KERNEL_PORT)
    wait_all_on(routers, "fastdp", timeout=10)
    assert pings(c1, ip2)


@pytest.mark.lab(hosts=3)
def test_a_password_keeps_peers_on_sleeve_unless_both_trust_each_others_subnet(lab: Lab) -> None:
    h1, h2, h3 = lab.hosts
    trusted = ("--trusted-subnets", f"{h1.address}/32,{h2.address}/32")
    quorum = ("--ipalloc-init", "consensus=3")
    routers = [
        LabRouter(h1, [], password="s3cret", extra=(*quorum, *trusted)),
        LabRouter(h2, [h1.address], password="s3cret", extra=(*quorum, *trusted)),
        LabRouter(h3, [h1.address], password="s3cret", extra=quorum),
    ]
    for router in routers:
        router.wait_ready()
    wait_until(lambda: full_mesh(routers), timeout=60, message="the mesh")
    attached = [attach(router) for router in routers]
    for (src, _), (_, dst) in itertools.permutations(attached, 2):
        wait_until(lambda src=src, dst=dst: pings(src, dst), timeout=20, message=f"{src} to reach {dst}")
    wait_until(lambda: paths(routers[0]) == {"h2": ("fastdp", None), "h3": ("sleeve", "encrypted")}, timeout=15,
               message=f"h1: h2 on fastdp (trusted), h3 on sleeve (encrypted); now {paths(routers[0])}")  # fmt: skip
    assert paths(routers[2]) == {"h1": ("sleeve", "encrypted"), "h2": ("sleeve", "encrypted")}
    assert "sleeve" in routers[2].cli("status", "connections") and "(encrypted)" in routers[2].cli(
        "status", "connections"
    )
    assert not [line for line in fdb_lines(h3) if line], "h3 (all peers encrypted) has no kernel path at all"


@pytest.mark.lab(hosts=3)
def test_a_cut_link_relays_via_the_middle_and_floods_arrive_exactly_once(lab: Lab) -> None:
    routers = start_mesh(lab)
    attached = [attach(router) for router in routers]
    (c1, ip1), (c2, _), (c3, ip3) = attached
    for (src, _), (_, dst) in itertools.permutations(attached, 2):
        wait_until(lambda src=src, dst=dst: pings(src, dst), timeout=20, message=f"{src} to reach {dst}")
    wait_all_on(routers, "fastdp")
    assert_floods_arrive_once(lab, c1, ip1, [c2, c3], "allfastdp")

    a = routers[0]
    lab.cut(lab.hosts[0], lab.hosts[2])
    h3_address = lab.hosts[2].address
    # The Rust datapath sees the silent link, the mesh routes h1 <-> h3 via h2: relayed on sleeve.
    wait_until(
        lambda: (
            paths(a).get("h3", ("gone", None))[0] != "fastdp"
            and not any(h3_address in line for line in fdb_lines(lab.hosts[0]))
        ),
        timeout=60,
        message=f"h1 to take h3 off fastdp and unpin its MACs (now {paths(a)})",
    )
    wait_until(lambda: pings(c1, ip3) and pings(c3, ip1), timeout=60, message="pings to be relayed via h2")
    reason = paths(a).get("h3", (None, None))[1]
    assert reason is None or reason.startswith(("relayed via", "no route", "kernel heartbeat")), reason
    assert paths(a).get("h2") == ("fastdp", None), "the link that still works stays on the kernel path"
    assert_floods_arrive_once(lab, c1, ip1, [c2, c3], "mixedpaths")
    lab.heal(lab.hosts[0], lab.hosts[2])
    wait_until(lambda: full_mesh(routers), timeout=90, message="the direct link to return")
    wait_all_on(routers, "fastdp", timeout=30)


def assert_floods_arrive_once(
    lab: Lab, sender: Container, sender_ip: str, receivers: list[Container], tag: str
) -> None:
    """Numbered multicast datagrams and ARP requests from `sender`: every receiver's interface sees
    each exactly once (a frame taking both paths, or flooded twice, would show twice)."""
    dumps: list[tuple[Path, LabProcess]] = []
    for container in receivers:
        pcap = lab.workdir / f"{tag}-{container.short_name}-{container.host.label}.pcap"
        dumps.append((pcap, captures.capture(container, "ethwe0", pcap, ["udp", "port", "5555", "or", "arp"])))
    sender.run([sys.executable, "-c", FLOOD_SENDER, sender_ip, tag])
    marker = tag.encode()
    for pcap, dump in dumps:
        wait_until(
            lambda pcap=pcap: len([f for f in captures.frames(pcap) if marker in f]) >= 2 * FLOODS,
            timeout=10,
            message=f"{pcap.name} to hold the {FLOODS} multicast datagrams and {FLOODS} ARP requests",
        )
        captures.stop_capture(dump)
        seen = Counter(
            f[f.index(marker) :] if f[12:14] != b"\x08\x06" else f for f in captures.frames(pcap) if marker in f
        )
        assert len(seen) == 2 * FLOODS and set(seen.values()) == {1}, f"{pcap.name}: {sorted(seen.values())}"


FLOODS = 20
# FLOODS numbered multicast datagrams, then FLOODS ARP requests (broadcast), each one different:
# the ARP ones carry the tag where a padding would be, so a copy is told from a retry.
FLOOD_SENDER = r"""
import socket, struct, sys, time
ip, tag = sys.argv[1], sys.argv[2].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
for n in range(20):
    s.sendto(tag + b"-%02d" % n, ("239.7.7.7", 5555))
    time.sleep(0.005)  # paced, so that no capture along the way misses one of a burst
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(("ethwe0", 0))
me = raw.getsockname()[4]
for n in range(20):
    target = socket.inet_aton(ip)[:3] + bytes([200 + n])
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + me + socket.inet_aton(ip) + bytes(6) + target
    raw.send(b"\xff" * 6 + me + b"\x08\x06" + arp + tag + b"-%02d" % n)
    time.sleep(0.005)
"""


@pytest.mark.lab(hosts=2)
def test_kill_9_and_restart_leaves_no_stale_or_duplicate_entries_and_traffic_resumes(lab: Lab) -> None:
    routers = start_mesh(lab)
    (c1, ip1), (c2, ip2) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2), timeout=20, message="the containers to reach each other")
    wait_all_on(routers, "fastdp")
    h1, h2 = lab.hosts
    pinger = c1.start(["ping", "-i", "0.05", ip2], name="pinger")  # traffic while the router dies
    routers[0].process.kill(signal.SIGKILL)
    routers[0].process.wait(timeout=10)
    assert vxlan.device_name(KERNEL_PORT) in h1.links(), "kill -9 leaves the device for the next start"
    wait_until(lambda: not any(h1.address in line for line in fdb_lines(h2)), timeout=40,
               message="h2 to unpin h1's MACs once the connection is gone")  # fmt: skip
    # on another kernel port: the killed router's device is still swept, whatever its port
    moved = KERNEL_PORT + 10
    restarted = LabRouter(h1, [], name="weavenet-restarted", extra=("--ipalloc-init", "consensus=2",
                                                                    "--kernel-port", str(moved)))  # fmt: skip
    restarted.wait_ready()
    wait_until(lambda: vxlan.device_name(moved) in h1.links(), timeout=20, message="the new router's device")
    assert vxlan.device_name(KERNEL_PORT) not in h1.links(), "the killed router's device was not swept"
    routers = [restarted, routers[1]]
    wait_until(lambda: full_mesh(routers), timeout=60, message="the restarted router to rejoin")
    wait_all_on(routers, "fastdp")
    wait_until(lambda: pings(c1, ip2) and pings(c2, ip1), timeout=20, message="traffic to resume")
    pinger.stop()
    for me, my_port, other, their_port in ((h1, moved, h2, KERNEL_PORT), (h2, KERNEL_PORT, h1, moved)):
        selfs = [line for line in fdb_lines(me, my_port) if " self " in line]
        macs = Counter(line.split()[0] for line in selfs)
        assert set(macs.values()) == {1}, f"{me.label}: duplicate entries {macs}"
        assert all(f"dst {other.address} " in line for line in selfs), f"{me.label}: stale entries {selfs}"
        their_macs = other.call(lambda their_port=their_port: local_macs(their_port))
        wait_until(lambda me=me, my_port=my_port, their_macs=their_macs:
                   their_macs <= {line.split()[0] for line in fdb_lines(me, my_port)},
                   timeout=10, message=f"{me.label} to pin {other.label}'s MACs {their_macs}")  # fmt: skip
        rules, jumps = kernel_rules(me)
        assert rules == [f"-A WEAVENET-KERNEL -s {other.address}/32 -j ACCEPT", "-A WEAVENET-KERNEL -j DROP"], rules
        assert len(jumps) == 1, jumps
    restarted.cli("stop")
    restarted.process.wait(timeout=20)
    assert not {vxlan.device_name(KERNEL_PORT), vxlan.device_name(moved)} & set(h1.links())
    assert kernel_rules(h1) == ([], [])
    # weavenet reset also clears what a killed router left behind
    routers[1].process.kill(signal.SIGKILL)
    routers[1].process.wait(timeout=10)
    assert vxlan.device_name(KERNEL_PORT) in h2.links()
    out = routers[1].cli("reset", "--state-dir", str(routers[1].state_dir), check=False)
    assert f"removed {vxlan.device_name(KERNEL_PORT)}" in out, out
    assert vxlan.device_name(KERNEL_PORT) not in h2.links() and kernel_rules(h2) == ([], [])


@pytest.mark.lab(hosts=3)
def test_vxlan_datagrams_from_a_host_that_is_not_a_peer_are_dropped_and_counted(lab: Lab) -> None:
    h1, h2, stranger = lab.hosts
    routers = [LabRouter(h1, [], extra=("--ipalloc-init", "consensus=2"))]
    routers.append(LabRouter(h2, [h1.address], extra=("--ipalloc-init", "consensus=2")))
    for router in routers:
        router.wait_ready()
    wait_until(lambda: full_mesh(routers), timeout=60, message="the mesh")
    (c1, ip1), (c2, ip2) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2), timeout=20, message="the containers to reach each other")
    wait_all_on(routers, "fastdp")
    receiver = c2.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((ip2, 9999))
    receiver.settimeout(0.5)
    forged = captures.vxlan_packet(
        vxlan.VNI, captures.ethernet_udp(mac_of(c2), mac_of(c1), ip1, ip2, 9999, b"forged by a stranger")
    )
    sender = stranger.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        before = routers[1].report()["KernelPath"]["ForeignDropped"]
        for _ in range(50):
            sender.sendto(forged, (h2.address, KERNEL_PORT))
        wait_until(lambda: routers[1].report()["KernelPath"]["ForeignDropped"] >= before + 50, timeout=10,
                   message="h2 to count the stranger's datagrams as dropped")  # fmt: skip
        with pytest.raises(TimeoutError):
            print("received:", receiver.recv(2048))
        assert metric(routers[1], "weavenet_kernel_foreign_dropped_total") >= before + 50
        # the same datagram from a peer's address is delivered: the drop was the firewall's doing
        peer_sender = h1.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            peer_sender.sendto(forged, (h2.address, KERNEL_PORT))
            receiver.settimeout(5)
            assert receiver.recv(2048) == b"forged by a stranger"
        finally:
            peer_sender.close()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.lab(hosts=2)
def test_no_fastdp_and_a_taken_port_keep_everything_on_sleeve_and_say_why(lab: Lab) -> None:
    h1, h2 = lab.hosts
    squatter = h2.start([sys.executable, "-c", PORT_SQUATTER, str(KERNEL_PORT)], name="squatter")
    squatter.wait_for_output(r"bound", timeout=20)
    quorum = ("--ipalloc-init", "consensus=2")
    routers = [LabRouter(h1, [], extra=(*quorum, "--no-fastdp")), LabRouter(h2, [h1.address], extra=quorum)]
    for router in routers:
        router.wait_ready()
    wait_until(lambda: full_mesh(routers), timeout=60, message="the mesh")
    (c1, _), (_, ip2) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2), timeout=20, message="the containers to reach each other on sleeve")
    assert paths(routers[0]) == {"h2": ("sleeve", "disabled by --no-fastdp")}
    wait_until(lambda: paths(routers[1]) == {"h1": ("sleeve", f"VXLAN port {KERNEL_PORT} in use")}, timeout=10,
               message=f"h2 to say its port is taken (now {paths(routers[1])})")  # fmt: skip
    assert f"(VXLAN port {KERNEL_PORT} in use)" in routers[1].cli("status", "connections")
    assert routers[1].report()["KernelPath"]["Problem"] == f"VXLAN port {KERNEL_PORT} in use"
    assert "FastPath: off (disabled by --no-fastdp), peers: 1 sleeve" in routers[0].cli("status")
    for host in (h1, h2):
        assert vxlan.device_name(KERNEL_PORT) not in host.links()
    assert kernel_rules(h2) == ([], []), "the port is another program's: no drop rule of ours on it"
    squatter.stop()


PORT_SQUATTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("bound", flush=True)
time.sleep(3600)
"""


def test_the_lab_blocks_one_udp_port_between_two_hosts_both_ways() -> None:
    from tests.lab.firewall import render

    rules = render([], [], [("h1", "h2", KERNEL_PORT)])
    assert '"h1" . "h2" . 6784, "h2" . "h1" . 6784' in rules
    assert "iifname . oifname . udp dport @blocked_udp counter drop" in rules
    with pytest.raises(ValueError, match="out of range"):
        render([], [], [("h1", "h2", 0)])


@pytest.mark.lab(hosts=3)
def test_a_mac_that_moves_to_another_host_is_followed(lab: Lab) -> None:
    routers = start_mesh(lab)
    h1, h2, h3 = lab.hosts
    (c1, _), (c2, ip2), (c3, _) = [attach(router) for router in routers]
    wait_until(lambda: pings(c1, ip2), timeout=20, message="h1's container to reach h2's")
    wait_all_on(routers, "fastdp")
    moving = mac_of(c2)
    wait_until(lambda: any(line.startswith(f"{moving} dst {h2.address} ") for line in fdb_lines(h1)), timeout=10,
               message=f"h1 to pin {moving} to h2")  # fmt: skip
    # The container goes from h2 and comes back on h3 with its MAC and address.
    routers[1].cli("detach", c2.path)
    c3.run(["ip", "link", "set", "ethwe0", "address", moving])
    c3.run(["ip", "addr", "add", f"{ip2}/12", "dev", "ethwe0"])
    wait_until(lambda: pings(c1, ip2), timeout=20, message=f"h1's container to reach {ip2} on h3")
    wait_until(
        lambda: (
            [line for line in fdb_lines(h1) if line.startswith(f"{moving} dst ")]
            == [f"{moving} dst {h3.address} self permanent"]
        ),
        timeout=10,
        message=f"h1 to pin {moving} to h3, and only there",
    )
