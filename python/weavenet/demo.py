"""`weavenet demo`: a three-host weavenet on this machine, shown working, then removed.

Each "host" is a network namespace on a private underlay (a bridge in its own namespace); a real
router runs in each (with a password unless --no-password, which puts the peers on the kernel
path), a "container" namespace on each is attached through the router's API, and the demo prints
what an operator would look at: status, ps, pings across hosts and an iperf3 throughput figure.
Everything it creates is named `wndemo<hex>-...` and removed at the end, also when interrupted.
It never touches the machine's own network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute, netns

from weavenet.api.client import ApiClient, ApiUnreachable
from weavenet.config import HttpAddress
from weavenet.net.kernel_path import NO_ROUTE, STARTING, WAITING

PASSWORD = "weavenet demo password"


class DemoError(Exception):
    """The demo could not run; the message says why."""


@dataclass
class DemoHost:
    label: str
    netns: str
    address: str
    workdir: Path
    container: str = ""
    overlay_ip: str = ""
    router: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def api(self) -> ApiClient:
        return ApiClient(HttpAddress(unix_path=str(self.workdir / "api.sock")), timeout=10.0)


def _in_netns(name: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{name}", "--", *argv]


def _run(name: str, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_in_netns(name, argv), capture_output=True, text=True, timeout=timeout)


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Demo:
    def __init__(self, hosts: int = 3, *, password: str | None = PASSWORD, seconds: int = 3) -> None:
        self.prefix = f"wndemo{secrets.token_hex(2)}"
        octet = int(self.prefix[-4:], 16) % 200 + 20
        self.subnet = f"10.254.{octet}"
        self.password = password
        self.seconds = seconds
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.switch = f"{self.prefix}-sw"
        self.hosts = [
            DemoHost(f"host{i}", f"{self.prefix}-h{i}", f"{self.subnet}.{i}", self.workdir / f"host{i}")
            for i in range(1, hosts + 1)
        ]
        self.namespaces: list[str] = []
        self.owner = os.getpid()

    # --- building ---

    def _add_netns(self, name: str) -> None:
        netns.create(name)
        self.namespaces.append(name)
        _wait(f"namespace {name} to appear", lambda: Path("/run/netns", name).exists(), timeout=5)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def build_underlay(self) -> None:
        self._add_netns(self.switch)
        with IPRoute(netns=self.switch) as ipr:
            ipr.link("add", ifname="underlay", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="underlay")[0], state="up")
        for host in self.hosts:
            self._add_netns(host.netns)
            host.workdir.mkdir(parents=True)
            port = f"sw-{host.label}"
            with IPRoute(netns=self.switch) as ipr:
                ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host.netns})
                bridge = ipr.link_lookup(ifname="underlay")[0]
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge, state="up")
            with IPRoute(netns=host.netns) as ipr:
                index = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=index, address=host.address, prefixlen=24)
                ipr.link("set", index=index, state="up")

    def launch_routers(self) -> None:
        seed = self.hosts[0].address
        for host in self.hosts:
            argv = [
                sys.executable,
                "-m",
                "weavenet",
                "launch",
                "--foreground",
                "--state-dir",
                str(host.workdir / "state"),
                "--http-addr",
                str(host.workdir / "api.sock"),
                "--nickname",
                host.label,
                "--no-plugin",
                "--ipalloc-init",
                f"consensus={len(self.hosts)}",
            ]
            if host is not self.hosts[0]:
                argv.append(seed)
            env = {k: v for k, v in os.environ.items() if k not in ("EXTRA_ARGS", "WEAVE_PASSWORD")}
            if self.password:
                env["WEAVE_PASSWORD"] = self.password
            host.log = host.workdir / "router.log"
            with open(host.log, "wb") as log:
                host.router = subprocess.Popen(
                    _in_netns(host.netns, argv),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )

    def _report(self, host: DemoHost) -> dict | None:
        if host.router is not None and host.router.poll() is not None:
            tail = host.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise DemoError(f"the router on {host.label} exited: " + " | ".join(tail))
        try:
            reply = host.api.request("GET", "/report", accept_json=True)
        except ApiUnreachable:
            return None
        return reply.json() if reply.status == 200 else None

    def _mesh_complete(self) -> bool:
        for host in self.hosts:
            report = self._report(host)
            if report is None:
                return False
            # Every router must know every peer's links as established: routes (and so the
            # broadcast tree ARP needs) use only links both ends confirm.
            peers = report["Router"]["Peers"]
            if len(peers) != len(self.hosts):
                return False
            for peer in peers:
                established = [c for c in peer.get("Connections", []) if c.get("Established")]
                if len(established) != len(self.hosts) - 1:
                    return False
            # Each peer on the path it keeps: fastdp once the kernel heartbeats pass (plain), or sleeve
            # for good (encrypted). Every host is a direct neighbour, so a relay is passing too.
            kernel_peers = (report.get("KernelPath") or {}).get("Peers") or {}
            if len(kernel_peers) != len(self.hosts) - 1:
                return False
            passing = (STARTING, WAITING, NO_ROUTE)
            if any(p["Reason"] in passing or (p["Reason"] or "").startswith("relayed") for p in kernel_peers.values()):
                return False
        return True

    def attach_containers(self) -> None:
        for host in self.hosts:
            host.container = f"{host.netns}-c"
            self._add_netns(host.container)
            reply = host.api.request("POST", "/attach", form={"target": f"/run/netns/{host.container}"})
            if reply.status != 200:
                raise DemoError(f"attach on {host.label} failed: {reply.text.strip()}")
            host.overlay_ip = reply.text.split()[0].split("/")[0]

    # --- showing ---

    def show(self, title: str, text: str) -> None:
        print(f"\n=== {title}")
        print(text.rstrip())

    def ping_across(self) -> None:
        source = self.hosts[0]
        for target in self.hosts[1:]:
            result = _run(source.container, ["ping", "-c3", "-i0.2", "-W2", target.overlay_ip])
            summary = [line for line in result.stdout.splitlines() if "packets transmitted" in line or "rtt" in line]
            verdict = "ok" if result.returncode == 0 else "FAILED"
            self.show(
                f"ping {source.label} container ({source.overlay_ip}) -> {target.label} container "
                f"({target.overlay_ip}): {verdict}",
                "\n".join(summary) or result.stderr,
            )
            if result.returncode != 0:
                raise DemoError(f"{source.label}'s container cannot reach {target.label}'s")

    def iperf(self) -> float:
        if shutil.which("iperf3") is None:
            print("\n(iperf3 is not installed: skipping the throughput test; apt-get install iperf3)")
            return 0.0
        server_host, client_host = self.hosts[1], self.hosts[0]
        server = subprocess.Popen(
            _in_netns(server_host.container, ["iperf3", "-s", "-1", "-B", server_host.overlay_ip]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait(
                "the iperf3 server to listen",
                lambda: ":5201 " in _run(server_host.container, ["ss", "-Hltn"]).stdout,
                timeout=10,
            )
            result = _run(
                client_host.container,
                ["iperf3", "-c", server_host.overlay_ip, "-t", str(self.seconds), "-J"],
                timeout=self.seconds + 20,
            )
            if result.returncode != 0 and not result.stdout.strip().startswith("{"):
                raise DemoError(f"iperf3 failed: {result.stdout[-300:]} {result.stderr[-300:]}")
            data = json.loads(result.stdout)
            if "error" in data or "sum_received" not in data.get("end", {}):
                raise DemoError(f"iperf3 failed: {data.get('error', 'no result')}")
            gbps = data["end"]["sum_received"]["bits_per_second"] / 1e9
            mode = "encrypted" if self.password else "plain"
            self.show(
                f"iperf3 {client_host.label} container -> {server_host.label} container, {self.seconds}s, TCP",
                f"{gbps:.2f} Gbit/s ({mode})",
            )
            return gbps
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    # --- tearing down ---

    def teardown(self) -> None:
        if os.getpid() != self.owner:
            return  # a forked helper process: the demo belongs to its parent
        for host in self.hosts:
            if host.router is not None and host.router.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(host.router.pid, signal.SIGTERM)
        for host in self.hosts:
            if host.router is not None:
                try:
                    host.router.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(host.router.pid, signal.SIGKILL)
                    host.router.wait()
        for name in reversed(self.namespaces):
            with contextlib.suppress(OSError):
                netns.remove(name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> None:
        started = time.monotonic()
        print(f"weavenet demo: {len(self.hosts)} hosts on the underlay {self.subnet}.0/24 (namespaces {self.prefix}-*)")
        self.build_underlay()
        self.launch_routers()
        _wait("a mesh with working datapaths, each peer on its path", self._mesh_complete, timeout=45)
        print(f"mesh of {len(self.hosts)} routers up after {time.monotonic() - started:.1f}s")
        self.attach_containers()
        self.show("weavenet status (host1)", self.hosts[0].api.request("GET", "/status").text)
        self.show("weavenet status connections (host1)", self.hosts[0].api.request("GET", "/status/connections").text)
        for host in self.hosts:
            self.show(f"weavenet ps ({host.label})", host.api.request("GET", "/ps").text)
        self.ping_across()
        self.iperf()
        print(f"\nweavenet demo finished in {time.monotonic() - started:.1f}s; tearing down")


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    owner = os.getpid()

    def raise_interrupt(signum: int, frame: object) -> None:
        # pyroute2 forks helpers (IPRoute(netns=...)) and ends them with SIGTERM; they inherit this
        # handler, and must die quietly instead of unwinding into our teardown.
        if os.getpid() != owner:
            os._exit(0)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(*, password: bool = True, seconds: int = 3) -> int:
    if os.geteuid() != 0:
        raise DemoError("the demo creates network namespaces: run it as root")
    if shutil.which("nsenter") is None:
        raise DemoError("nsenter not found (Debian package util-linux)")
    demo = Demo(password=PASSWORD if password else None, seconds=seconds)
    with _terminate_on_sigterm():
        try:
            demo.run()
        finally:
            demo.teardown()
    return 0
