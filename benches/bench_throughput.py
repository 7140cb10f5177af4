"""Overlay throughput and RTT, measured in one run against the references on the same machine.

Two lab hosts joined by the lab switch (underlay MTU 1500). In the same run, one system at a time:
the underlay itself, kernel VXLAN host to host and (`vxlan-bridge`) container → veth → bridge →
VXLAN as one would configure it by hand, fastd (salsa2012+umac) and wireguard-go when installed,
weavenet plain and encrypted on the Rust datapath (container → bridge → TAP → Rust datapath → UDP →
... → container), and `weavenet-kernel`: real routers, no password, so the kernel fast path carries
the containers' traffic (container → bridge → the router's VXLAN port → ... → container).
Each gets ping RTT (50 pings at 10 ms) and iperf3 TCP with 1 and 4 streams, plus the CPU the
datapath threads / daemons used during the 1-stream run. Machines are noisy, so only ratios to
systems measured in the same run are gated (the idea of benches/ratio.py), never absolute Gbit/s.

RTT is also measured with fastd and weavenet up at once, taking turns (rtt_taking_turns): the
fair comparison on a machine whose RTTs drift between minutes.

Run: `pytest benches/bench_throughput.py -s` (BENCH_SECONDS=10 for the issue's 10 s runs), or
`python -m benches.bench_throughput` for the table alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.lab import Lab, LabProcess, Namespace, iperf3, wait_until
from tests.prereq import require_command
from weavenet._fastdp import DataKeys, Datapath, MeshHandshake, MeshKey, datapath_overlay_mtu

SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
# Gates (same-run ratios). The targets are 3x fastd encrypted and 0.3x VXLAN plain; CI
# gates a noise-tolerant floor.
MIN_PLAIN_VS_VXLAN = float(os.environ.get("BENCH_MIN_PLAIN_VS_VXLAN", "0.3"))
MIN_ENCRYPTED_VS_FASTD = float(os.environ.get("BENCH_MIN_ENCRYPTED_VS_FASTD", "1.5"))
# RTT: the target is <= fastd's (measured taking turns, see rtt_taking_turns); CI gates a
# noise-tolerant ceiling.
MAX_RTT_VS_FASTD = float(os.environ.get("BENCH_MAX_RTT_VS_FASTD", "1.5"))
# An idle-link RTT needs CPUs that are free. When other work keeps them busy during the pings (CI
# beside CPU hogs), the ratio swings 0.9-2.3x between runs with where the scheduler puts the hogs:
# fastd answers in the thread that wrote the frame, while our reply waits for the send thread to be
# woken (the hand-over issue 16 removes). Then only a gross regression is gated.
SATURATED = 0.75  # share of all CPUs busy during the pings
MAX_RTT_VS_FASTD_SATURATED = float(os.environ.get("BENCH_MAX_RTT_VS_FASTD_SATURATED", "3.0"))
RTT_ROUNDS = 8
RTT_SYSTEMS = ("fastd", "weavenet-encrypted-host", "weavenet-encrypted")
# The kernel fast path: the targets are >= 0.9x hand-made VXLAN (1 and 4 streams) and an
# idle RTT <= 1.2x; CI gates noise-tolerant bounds.
MIN_KERNEL_VS_VXLAN = float(os.environ.get("BENCH_MIN_KERNEL_VS_VXLAN", "0.7"))
MAX_KERNEL_RTT_VS_VXLAN = float(os.environ.get("BENCH_MAX_KERNEL_RTT_VS_VXLAN", "1.5"))
KERNEL_RTT_SYSTEMS = ("vxlan-bridge", "weavenet-kernel")


@dataclass
class Endpoints:
    """Where a system is measured: iperf3/ping from `client` to `server_ip` inside `server`."""

    name: str
    client: Namespace
    server: Namespace
    server_ip: str
    mtu: int
    cpu: Callable[[], dict[str, float]] = field(default=lambda: {})  # cumulative CPU seconds by actor


@dataclass
class Result:
    name: str
    mtu: int
    tcp1_gbps: float
    tcp4_gbps: float
    rtt_ms: float
    rtt_median_ms: float
    retransmits: int
    cpu_note: str

    def line(self) -> str:
        return (
            f"{self.name:<20} {self.tcp1_gbps:7.2f} {self.tcp4_gbps:7.2f} "
            f"{self.rtt_ms:8.3f} {self.rtt_median_ms:8.3f}  mtu={self.mtu} "
            f"retr={self.retransmits} {self.cpu_note}"
        )


# -- CPU accounting -------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: str) -> float:
    """utime+stime of a /proc/.../stat file, in seconds (0 if it is gone)."""
    try:
        text = Path(stat_path).read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def datapath_threads(peer: int) -> Callable[[], dict[str, float]]:
    """CPU seconds of one datapath's send and receive threads (named dp-send-XXXX / dp-recv-XXXX)."""
    suffix = f"{peer & 0xFFFF:04x}"

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            if comm.endswith(suffix) and comm.startswith("dp-"):
                out[comm[:7]] = _ticks(str(task / "stat"))
        return out

    return read


def processes_cpu(processes: dict[str, LabProcess]) -> Callable[[], dict[str, float]]:
    return lambda: {name: _ticks(f"/proc/{p.pid}/stat") for name, p in processes.items()}


# -- measurement ----------------------------------------------------------------------------------


def ping_times_ms(client: Namespace, address: str, count: int) -> list[float]:
    """RTTs of `count` pings at 10 ms (lost ones left out)."""
    out = client.run(["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", address], check=False).stdout
    return [float(t) for t in re.findall(r"time=([\d.]+)", out)]


def warm_up(client: Namespace, address: str) -> None:
    client.run(["ping", "-n", "-q", "-c", "5", "-i", "0.05", address], check=False)


def ping_rtt_ms(client: Namespace, address: str) -> tuple[float, float]:
    """(average, median) RTT of 50 pings at 10 ms on the idle path, after 5 warm-up pings."""
    warm_up(client, address)
    times = ping_times_ms(client, address, 50)
    if not times:
        return float("nan"), float("nan")
    return statistics.mean(times), statistics.median(times)


def measure(system: Endpoints) -> Result:
    system.client.wait_reachable(system.server_ip, timeout=45)
    rtt, rtt_median = ping_rtt_ms(system.client, system.server_ip)
    cpu_before, (busy0, total0), t0 = system.cpu(), machine_busy(), time.monotonic()
    one = iperf3(system.server, system.client, system.server_ip, seconds=SECONDS)
    cpu_after, (busy1, total1), elapsed = system.cpu(), machine_busy(), time.monotonic() - t0
    four = iperf3(system.server, system.client, system.server_ip, seconds=SECONDS, parallel=4)
    actors = " ".join(
        f"{name}={100 * (cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0)) / elapsed:.0f}%" for name in cpu_after
    )
    machine = 100 * (busy1 - busy0) / max(total1 - total0, 1.0)
    return Result(
        system.name,
        system.mtu,
        one.received_gbps,
        four.received_gbps,
        rtt,
        rtt_median,
        one.retransmits or 0,
        f"cpu={machine:.0f}% {actors}".strip(),
    )


# -- systems --------------------------------------------------------------------------------------


def underlay(lab: Lab) -> Iterator[Endpoints]:
    h1, h2 = lab.hosts[:2]
    yield Endpoints("underlay", h1, h2, h2.address, lab.mtu)


def vxlan(lab: Lab) -> Iterator[Endpoints]:
    h1, h2 = lab.hosts[:2]
    for me, other in ((h1, h2), (h2, h1)):
        me.run(["ip", "link", "add", "bvx0", "type", "vxlan", "id", "42", "remote", other.address, "dstport", "4789"])
        me.run(["ip", "link", "set", "bvx0", "mtu", str(lab.mtu - 50), "up"])
        me.add_address("bvx0", f"10.41.0.{me.number}/24")
    try:
        yield Endpoints("vxlan", h1, h2, f"10.41.0.{h2.number}", lab.mtu - 50)
    finally:
        for host in (h1, h2):
            host.run(["ip", "link", "del", "bvx0"], check=False)


def vxlan_bridge(lab: Lab) -> Iterator[Endpoints]:
    """Kernel VXLAN the way one sets it up by hand for containers: a bridge per host with the VXLAN
    device (one remote, learning off) and a container's veth on it, MTU 1450."""
    h1, h2 = lab.hosts[:2]
    containers = {}
    for me, other in ((h1, h2), (h2, h1)):
        me.run(["ip", "link", "add", "bvxk", "type", "vxlan", "id", "43", "remote", other.address, "dstport", "4790",
                "nolearning"])  # fmt: skip
        me.add_bridge("bvxb")
        me.set_link("bvxk", mtu=lab.mtu - 50, master="bvxb", up=True)
        container = me.add_container("cvxb")
        me.add_veth_to(container, "bvxv", "eth0", bridge="bvxb", mtu=lab.mtu - 50)
        container.add_address("eth0", f"10.46.0.{me.number}/24")
        containers[me.label] = container
    try:
        yield Endpoints("vxlan-bridge", containers["h1"], containers["h2"], f"10.46.0.{h2.number}", lab.mtu - 50)
    finally:
        for host in (h1, h2):
            host.run(["ip", "link", "del", "bvxk"], check=False)
            host.run(["ip", "link", "del", "bvxb"], check=False)


def weavenet_kernel(lab: Lab) -> Iterator[Endpoints]:
    """Real routers without a password: containers attached with `weavenet attach`, traffic on the
    kernel fast path once both say fastdp. CPU: the routers' processes (the packets are the
    kernel's, counted in the machine's figure)."""
    from tests.routers import LabRouter, full_mesh

    h1, h2 = lab.hosts[:2]
    quorum = ("--ipalloc-init", "consensus=2")
    routers = [
        LabRouter(h1, [], extra=quorum, name="weavenet-k"),
        LabRouter(h2, [h1.address], extra=quorum, name="weavenet-k"),
    ]
    try:
        for router in routers:
            router.wait_ready()
        wait_until(lambda: full_mesh(routers), timeout=60, message="the routers to connect")
        ends = []
        for router in routers:
            container = router.host.add_container("ck")
            ends.append((container, router.cli("attach", container.path).strip().split()[-1].split("/")[0]))
        wait_until(
            lambda: all(c["Attrs"].get("name") == "fastdp" for r in routers for c in r.connections()),
            timeout=30,
            message="both routers to carry the link on fastdp",
        )
        (c1, _), (c2, ip2) = ends
        mtu = int(routers[0].connections()[0]["Attrs"]["mtu"])
        cpu = processes_cpu({f"router-{r.host.label}": r.process for r in routers})
        yield Endpoints("weavenet-kernel", c1, c2, ip2, mtu, cpu)
    finally:
        for router in routers:
            router.process.stop()


def fastd(lab: Lab) -> Iterator[Endpoints]:
    h1, h2 = lab.hosts[:2]
    keys = {}
    for host in (h1, h2):
        out = host.run(["fastd", "--generate-key"]).stdout
        secret = re.search(r"Secret: (\w+)", out)
        public = re.search(r"Public: (\w+)", out)
        assert secret and public, out
        keys[host.label] = (secret.group(1), public.group(1))
    mtu = 1420
    processes = {}
    for me, other in ((h1, h2), (h2, h1)):
        config = lab.workdir / f"fastd-{me.label}.conf"
        config.write_text(
            f'log level warn;\ninterface "bfd0";\nmode tun;\nbind {me.address}:10000;\n'
            f'method "salsa2012+umac";\nsecret "{keys[me.label][0]}";\nmtu {mtu};\n'
            f'peer "{other.label}" {{ key "{keys[other.label][1]}"; remote {other.address}:10000; }}\n'
        )
        processes[f"fastd-{me.label}"] = me.start(["fastd", "--config", str(config)], name="fastd")
    for me in (h1, h2):
        wait_until(lambda me=me: "bfd0" in me.links(), timeout=10, message="fastd's tun")
        me.add_address("bfd0", f"10.42.0.{me.number}/24")
        me.set_link("bfd0", up=True)
    try:
        yield Endpoints("fastd", h1, h2, f"10.42.0.{h2.number}", mtu, processes_cpu(processes))
    finally:
        for p in processes.values():
            p.stop()


def wireguard_go(lab: Lab) -> Iterator[Endpoints]:
    h1, h2 = lab.hosts[:2]
    keys = {}
    for host in (h1, h2):
        private = host.run(["wg", "genkey"]).stdout.strip()
        public = host.run(["wg", "pubkey"], input=private + "\n").stdout.strip()
        keys[host.label] = (private, public)
    processes = {}
    mtu = 1420
    for me, other in ((h1, h2), (h2, h1)):
        ifname = f"bwg{me.number}"
        processes[f"wg-{me.label}"] = me.start(
            ["wireguard-go", "-f", ifname], name="wireguard-go", env={"WG_PROCESS_FOREGROUND": "1"}
        )
        wait_until(lambda me=me, ifname=ifname: ifname in me.links(), timeout=10, message="wireguard-go's tun")
        # wireguard-go opens its control socket (/var/run/wireguard/<if>.sock) only after the tun.
        wait_until(
            lambda me=me, ifname=ifname: me.run(["wg", "show", ifname], check=False).returncode == 0,
            timeout=10,
            message=f"wireguard-go's control socket for {ifname} (`wg show {ifname}` to succeed)",
        )
        key_file = lab.workdir / f"wg-{me.label}.key"
        key_file.write_text(keys[me.label][0] + "\n")
        peer = keys[other.label][1]
        wg = ["wg", "set", ifname, "private-key", str(key_file), "listen-port", "51820"]
        me.run([*wg, "peer", peer, "endpoint", f"{other.address}:51820", "allowed-ips", "10.43.0.0/24"])
        me.add_address(ifname, f"10.43.0.{me.number}/24")
        me.set_link(ifname, mtu=mtu, up=True)
    try:
        yield Endpoints("wireguard-go", h1, h2, f"10.43.0.{h2.number}", mtu, processes_cpu(processes))
    finally:
        for p in processes.values():
            p.stop()


def handshake_keys() -> tuple[DataKeys, DataKeys]:
    key = MeshKey.from_password(b"bench")
    sides = [
        MeshHandshake(key, initiator=True, intro=b"i", prologue=b"bench"),
        MeshHandshake(key, initiator=False, intro=b"r", prologue=b"bench"),
    ]
    inbox: list[list[bytes]] = [[], []]
    while not all(s.is_complete for s in sides):
        for me in (0, 1):
            while (body := sides[me].write_message()) is not None:
                inbox[me ^ 1].append(body)
        for me in (0, 1):
            if inbox[me]:
                sides[me].read_message(inbox[me].pop(0))
    return sides[0].finish()[1], sides[1].finish()[1]


def weavenet(lab: Lab, encrypted: bool, *, host_side: bool = False) -> Iterator[Endpoints]:
    """Container to container across the bridge, TAP and datapath of each host; with `host_side`,
    host to host over the bridge's own address (as `weave expose` does): no container veth, the
    same shape as the tun-based anchors, which isolates what the datapath itself costs."""
    h1, h2 = lab.hosts[:2]
    tag = ("x" if encrypted else "p") + ("h" if host_side else "")
    port = (6784 if encrypted else 6783) + (10 if host_side else 0)
    mtu = datapath_overlay_mtu(lab.mtu, encrypted)
    keys: tuple[DataKeys | None, DataKeys | None] = handshake_keys() if encrypted else (None, None)
    subnet = (45 if encrypted else 44) + (10 if host_side else 0)
    ids = {h.label: (0x0B0000000000 if encrypted else 0x0C0000000000) + 16 * host_side + h.number for h in (h1, h2)}
    datapaths: list[Datapath] = []
    containers: dict[str, Namespace] = {}
    try:
        for host in (h1, h2):
            host.add_bridge(f"bw{tag}")
            datapaths.append(host.call(lambda host=host: Datapath.open(f"bdp{tag}", port, mtu, ids[host.label])))
            host.set_link(f"bdp{tag}", master=f"bw{tag}", mtu=65000, up=True)
            if host_side:
                host.set_link(f"bw{tag}", mtu=mtu)
                host.add_address(f"bw{tag}", f"10.{subnet}.0.{host.number}/24")
                containers[host.label] = host
                continue
            container = host.add_container(f"c{tag}")
            host.add_veth_to(container, f"bv{tag}", "ethwe0", bridge=f"bw{tag}", mtu=mtu)
            container.add_address("ethwe0", f"10.{subnet}.0.{host.number}/24")
            containers[host.label] = container
        for datapath, other, key in ((datapaths[0], h2, keys[0]), (datapaths[1], h1, keys[1])):
            datapath.set_peer(ids[other.label], other.address, port, key)
            datapath.set_routes({ids[other.label]: ids[other.label]}, [ids[other.label]])
        sender, receiver = datapath_threads(ids[h1.label]), datapath_threads(ids[h2.label])

        def cpu() -> dict[str, float]:
            a, b = sender(), receiver()
            return {f"h1:{k}": v for k, v in a.items()} | {f"h2:{k}": v for k, v in b.items()}

        name = ("weavenet-encrypted" if encrypted else "weavenet-plain") + ("-host" if host_side else "")
        yield Endpoints(name, containers["h1"], containers["h2"], f"10.{subnet}.0.{h2.number}", mtu, cpu)
    finally:
        for datapath in datapaths:
            datapath.close()


SYSTEMS: dict[str, Callable[[Lab], Iterator[Endpoints]]] = {
    "underlay": underlay,
    "vxlan": vxlan,
    "fastd": fastd,
    "wireguard-go": wireguard_go,
    "weavenet-plain": lambda lab: weavenet(lab, False),
    "weavenet-encrypted": lambda lab: weavenet(lab, True),
    "weavenet-encrypted-host": lambda lab: weavenet(lab, True, host_side=True),
    "vxlan-bridge": vxlan_bridge,
    "weavenet-kernel": weavenet_kernel,
}
NEEDS = {"fastd": "fastd", "wireguard-go": "wireguard-go"}


def available() -> list[str]:
    """Systems for the main table; the kernel path and its reference are measured apart, interleaved
    (kernel_path_ratios), since their ratio is the one gated closest to 1."""
    return [name for name in SYSTEMS if shutil.which(NEEDS.get(name, "ip")) and name not in KERNEL_RTT_SYSTEMS]


ANCHORS = frozenset({"fastd", "wireguard-go"})


def run_all(lab: Lab, names: list[str]) -> dict[str, Result]:
    """Measure each system in turn. A third-party anchor that fails to come up is reported and
    skipped (its gate is then not checked); a failure of ours fails the run."""
    results = {}
    for name in names:
        try:
            with ExitStack() as stack:
                system = stack.enter_context(contextmanager(SYSTEMS[name])(lab))
                results[name] = measure(system)
        except Exception as error:
            if name not in ANCHORS:
                raise
            print(f"{name:<20} FAILED to measure: {error}", flush=True)
            continue
        print(results[name].line(), flush=True)
    return results


@dataclass
class RttTurns:
    rtt: dict[str, float]  # ms, median of the rounds' medians, by system
    busy: float  # share of all CPUs busy while the pings ran (others' work: pings cost next to nothing)


def rtt_taking_turns(systems: list[Endpoints], rounds: int = RTT_ROUNDS) -> RttTurns:
    """Median over `rounds` of each system's median ping RTT (ms). All are up at once and take
    turns within each round, so a slow spell of the machine (RTTs here drift 2x between minutes)
    hits every system alike instead of whichever was measured then."""
    for system in systems:
        system.client.wait_reachable(system.server_ip, timeout=45)
        warm_up(system.client, system.server_ip)
    medians: dict[str, list[float]] = {system.name: [] for system in systems}
    busy0, total0 = machine_busy()
    for _ in range(rounds):
        for system in systems:
            times = ping_times_ms(system.client, system.server_ip, 30)
            if times:
                medians[system.name].append(statistics.median(times))
    busy1, total1 = machine_busy()
    rtt = {name: statistics.median(values) for name, values in medians.items() if values}
    return RttTurns(rtt, (busy1 - busy0) / max(total1 - total0, 1.0))


def report_rtt(turns: RttTurns) -> str:
    rtt = turns.rtt
    line = "RTT taking turns (median of round medians, ms): " + "  ".join(f"{n} {v:.3f}" for n, v in rtt.items())
    if "fastd" in rtt:
        line += "\n" + "  ".join(f"{n} / fastd {v / rtt['fastd']:.2f}x" for n, v in rtt.items() if n != "fastd")
    return line + f"\nCPUs busy during the pings: {turns.busy:.0%}"


def report(results: dict[str, Result]) -> str:
    lines = [f"# {socket.gethostname()} cpus={os.cpu_count()} seconds={SECONDS} threads={threading.active_count()}"]
    lines.append(f"{'system':<20} {'tcp1':>7} {'tcp4':>7} {'rtt_avg':>8} {'rtt_med':>8}  (Gbit/s, ms)")
    lines += [r.line() for r in results.values()]
    base = [n for n in ("vxlan", "vxlan-bridge", "fastd", "wireguard-go", "underlay") if n in results]
    for ours in ("weavenet-kernel", "weavenet-plain", "weavenet-encrypted", "weavenet-encrypted-host"):
        if ours not in results:
            continue
        o = results[ours]
        for ref in base:
            r = results[ref]
            lines.append(
                f"{ours} / {ref}: tcp1 {o.tcp1_gbps / r.tcp1_gbps:.2f}x  tcp4 {o.tcp4_gbps / r.tcp4_gbps:.2f}x  "
                f"rtt {o.rtt_ms / r.rtt_ms:.2f}x (median {o.rtt_median_ms / r.rtt_median_ms:.2f}x)"
            )
    return "\n".join(lines)


@pytest.mark.lab(hosts=2)
def test_throughput_ratios(lab: Lab) -> None:
    # The anchors are prerequisites: without them the gate (encrypted vs fastd) is not checked.
    require_command("fastd", "fastd")
    require_command("wireguard-go", "wireguard-go")
    results = run_all(lab, available())
    print("\n" + report(results))
    plain, encrypted = results["weavenet-plain"], results["weavenet-encrypted"]
    ratio = plain.tcp1_gbps / results["vxlan"].tcp1_gbps
    assert ratio >= MIN_PLAIN_VS_VXLAN, f"weavenet plain is {ratio:.2f}x kernel VXLAN (want >= {MIN_PLAIN_VS_VXLAN})"
    if "fastd" in results:
        ratio = encrypted.tcp1_gbps / results["fastd"].tcp1_gbps
        assert ratio >= MIN_ENCRYPTED_VS_FASTD, (
            f"weavenet encrypted is {ratio:.2f}x fastd (want >= {MIN_ENCRYPTED_VS_FASTD})"
        )
    else:
        pytest.fail("fastd is installed but could not be measured, so the encrypted-vs-fastd gate is unchecked")


@pytest.mark.lab(hosts=2)
def test_rtt_against_fastd_taking_turns(lab: Lab) -> None:
    require_command("fastd", "fastd")
    turns = measure_rtt_taking_turns(lab)
    print("\n" + report_rtt(turns))
    ratio = turns.rtt["weavenet-encrypted"] / turns.rtt["fastd"]
    saturated = turns.busy >= SATURATED
    limit = MAX_RTT_VS_FASTD_SATURATED if saturated else MAX_RTT_VS_FASTD
    if saturated:
        print(f"the CPUs were saturated by other work: gating only a gross regression (<= {limit}x)")
    assert ratio <= limit, f"encrypted RTT is {ratio:.2f}x fastd's (want <= {limit}; CPUs {turns.busy:.0%} busy)"


@dataclass
class KernelRatios:
    tcp1: dict[str, float]  # median Gbit/s of the rounds, by system
    tcp4: dict[str, float]
    rtt_ms: dict[str, float]  # median of the round medians, pings at 0.2 s on the idle path
    cpu: dict[str, str]

    def report(self) -> str:
        ref, ours = KERNEL_RTT_SYSTEMS
        lines = [f"{'system':<20} {'tcp1':>7} {'tcp4':>7} {'rtt_med':>8}  (Gbit/s, ms; ABBA rounds)"]
        for name in KERNEL_RTT_SYSTEMS:
            lines.append(
                f"{name:<20} {self.tcp1[name]:7.2f} {self.tcp4[name]:7.2f} {self.rtt_ms[name]:8.3f}  {self.cpu[name]}"
            )
        lines.append(
            f"{ours} / {ref}: tcp1 {self.tcp1[ours] / self.tcp1[ref]:.2f}x  "
            f"tcp4 {self.tcp4[ours] / self.tcp4[ref]:.2f}x  idle rtt {self.rtt_ms[ours] / self.rtt_ms[ref]:.2f}x"
        )
        return "\n".join(lines)


def kernel_path_ratios(lab: Lab, rounds: int = 2) -> KernelRatios:
    """weavenet-kernel against vxlan-bridge, both up at once, taking turns (A B B A ...), so the
    machine's slow spells hit both alike; then idle RTT, taking turns too."""
    with ExitStack() as stack:
        systems = {name: stack.enter_context(contextmanager(SYSTEMS[name])(lab)) for name in KERNEL_RTT_SYSTEMS}
        for system in systems.values():
            system.client.wait_reachable(system.server_ip, timeout=45)
            warm_up(system.client, system.server_ip)
        runs: dict[tuple[str, int], list[float]] = {}
        cpu: dict[str, str] = {}
        for turn in range(rounds):
            order = list(KERNEL_RTT_SYSTEMS) if turn % 2 == 0 else list(reversed(KERNEL_RTT_SYSTEMS))
            for name in order:
                system = systems[name]
                for streams in (1, 4):
                    before, (busy0, total0), t0 = system.cpu(), machine_busy(), time.monotonic()
                    result = iperf3(system.server, system.client, system.server_ip, seconds=SECONDS, parallel=streams)
                    runs.setdefault((name, streams), []).append(result.received_gbps)
                    if streams == 1:
                        after, (busy1, total1) = system.cpu(), machine_busy()
                        elapsed = time.monotonic() - t0
                        actors = " ".join(
                            f"{k}={100 * (after.get(k, 0.0) - before.get(k, 0.0)) / elapsed:.0f}%" for k in after
                        )
                        machine = 100 * (busy1 - busy0) / max(total1 - total0, 1.0)
                        cpu[name] = f"cpu={machine:.0f}% (both hosts, packets in softirq) {actors}".strip()
        rtt: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(RTT_ROUNDS // 2):
            for name, system in systems.items():
                out = system.client.run(["ping", "-n", "-c", "10", "-i", "0.2", system.server_ip], check=False).stdout
                times = [float(t) for t in re.findall(r"time=([\d.]+)", out)]
                if times:
                    rtt[name].append(statistics.median(times))
    return KernelRatios(
        tcp1={name: statistics.median(runs[(name, 1)]) for name in KERNEL_RTT_SYSTEMS},
        tcp4={name: statistics.median(runs[(name, 4)]) for name in KERNEL_RTT_SYSTEMS},
        rtt_ms={name: statistics.median(values) for name, values in rtt.items()},
        cpu=cpu,
    )


@pytest.mark.lab(hosts=2)
def test_kernel_path_against_hand_made_vxlan(lab: Lab) -> None:
    ratios = kernel_path_ratios(lab)
    print("\n" + ratios.report())
    ref, ours = KERNEL_RTT_SYSTEMS
    for streams, figures in (("1 stream", ratios.tcp1), ("4 streams", ratios.tcp4)):
        ratio = figures[ours] / figures[ref]
        assert ratio >= MIN_KERNEL_VS_VXLAN, f"{streams}: weavenet's kernel path is {ratio:.2f}x hand-made VXLAN"
    ratio = ratios.rtt_ms[ours] / ratios.rtt_ms[ref]
    assert ratio <= MAX_KERNEL_RTT_VS_VXLAN, f"idle RTT is {ratio:.2f}x hand-made VXLAN's"


def measure_rtt_taking_turns(lab: Lab) -> RttTurns:
    with ExitStack() as stack:
        systems = [stack.enter_context(contextmanager(SYSTEMS[name])(lab)) for name in RTT_SYSTEMS]
        return rtt_taking_turns(systems)


def main() -> None:
    names = [n for n in os.environ.get("BENCH_SYSTEMS", ",".join(available())).split(",") if n]
    with Lab(hosts=2) as lab:
        print(report(run_all(lab, names)))
    if shutil.which("fastd"):
        with Lab(hosts=2) as lab:  # a fresh lab: each system starts its processes once per lab
            print(report_rtt(measure_rtt_taking_turns(lab)))
    with Lab(hosts=2) as lab:
        print(kernel_path_ratios(lab).report())


if __name__ == "__main__":
    main()
