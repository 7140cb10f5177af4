"""One named network namespace of the lab and everything a test does in it.

Plumbing (links, addresses, routes, bridges, veths) goes through pyroute2 netlink opened inside the
namespace; sockets and sysctls through a short-lived thread that has entered the namespace with
setns(2), so the test process itself never changes namespace; programs through tests.lab.process.
This module must never touch the namespace the test runs in (the machine's own network): every
netlink socket, thread and program here is inside a namespace the lab created.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from tests.lab.process import CommandFailed, Env, LabProcess, run_in_netns, stop_all
from tests.lab.wait import wait_until

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
IFNAMSIZ = 15  # longest interface name Linux accepts
_CLONE_NEWNET = 0x40000000
_NETWORK_ERRORS = ("unreachable", "not permitted", "no buffer space", "no route")  # ping's "no" answers
_libc = ctypes.CDLL(None, use_errno=True)


class Addressable(Protocol):
    """Anything with an IP address to aim at (a lab Host; a string works too)."""

    @property
    def address(self) -> str: ...


def address_of(target: str | Addressable) -> str:
    return target if isinstance(target, str) else target.address


def check_ifname(ifname: str) -> str:
    if not ifname or len(ifname) > IFNAMSIZ or "/" in ifname or ifname.strip() != ifname:
        raise ValueError(f"bad interface name {ifname!r} (1-{IFNAMSIZ} characters, no '/' or spaces)")
    return ifname


@dataclass(frozen=True)
class VethPair:
    """A veth pair: `local` in `local_ns`, `peer` in `peer_ns`."""

    local_ns: Namespace
    local: str
    peer_ns: Namespace
    peer: str


class Namespace:
    """A network namespace at /run/netns/<name>, plus the programs the lab started in it.

    `label` is the short name used in messages and log directories ("h1", "h1-c1", "switch").
    """

    def __init__(self, name: str, *, label: str, logdir: Path) -> None:
        self.name = name
        self.label = label
        self.path = f"{NETNS_RUN_DIR}/{name}"
        self.logdir = logdir
        self.processes: list[LabProcess] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} netns={self.name}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self) -> None:
        """Create the namespace (it must not exist yet) and bring its loopback up."""
        if os.path.exists(self.path):
            raise FileExistsError(errno.EEXIST, "network namespace already exists", self.path)
        pyroute2_netns.create(self.name)
        self.set_link("lo", up=True)

    def exists(self) -> bool:
        return self.name in pyroute2_netns.listnetns()

    def remove(self) -> None:
        """Unmount and delete the namespace's name (the kernel frees it once nothing uses it)."""
        if self.exists():
            pyroute2_netns.remove(self.name)

    @property
    def inode(self) -> int:
        """The namespace's inode: what `readlink /proc/<pid>/ns/net` shows as net:[inode]."""
        return os.stat(self.path).st_ino

    def pids(self) -> list[int]:
        """Every process (other than zombies) whose network namespace is this one."""
        from tests.lab.sweep import pids_in_namespaces  # sweep imports this module

        return pids_in_namespaces([self.path]).get(self.path, [])

    # -- netlink -----------------------------------------------------------------------------

    def iproute(self) -> IPRoute:
        """A pyroute2 IPRoute bound to this namespace; use it as a context manager."""
        return IPRoute(netns=self.name)

    def links(self) -> list[str]:
        """Names of the interfaces in this namespace."""
        with self.iproute() as ipr:
            return [link.get("ifname") for link in ipr.link("dump")]

    def set_link(
        self, ifname: str, *, up: bool | None = None, mtu: int | None = None, master: str | None = None
    ) -> None:
        """Change an interface: state, MTU, or enslave it to bridge `master` (in this namespace)."""
        with self.iproute() as ipr:
            index = _index(ipr, ifname, self)
            changes: dict[str, object] = {}
            if mtu is not None:
                changes["mtu"] = mtu
            if master is not None:
                changes["master"] = _index(ipr, master, self)
            if up is not None:
                changes["state"] = "up" if up else "down"
            if changes:
                ipr.link("set", index=index, **changes)

    def add_bridge(self, ifname: str, *, mtu: int | None = None, up: bool = True) -> str:
        """Create a Linux bridge (STP off) in this namespace; returns its name."""
        with self.iproute() as ipr:
            ipr.link("add", ifname=check_ifname(ifname), kind="bridge")
        self.set_link(ifname, mtu=mtu, up=up)
        return ifname

    def add_veth(
        self,
        ifname: str,
        peer_ns: Namespace,
        peer_ifname: str,
        *,
        mtu: int | None = None,
        bridge: str | None = None,
        up: bool = True,
    ) -> VethPair:
        """Create a veth pair: `ifname` here, `peer_ifname` in `peer_ns`; optionally enslave ours.

        Both ends get `mtu` (if given) and are brought up unless up=False; no addresses are set.
        """
        check_ifname(ifname)
        check_ifname(peer_ifname)
        with self.iproute() as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": peer_ns.name})
        self.set_link(ifname, mtu=mtu, master=bridge, up=up)
        peer_ns.set_link(peer_ifname, mtu=mtu, up=up)
        return VethPair(self, ifname, peer_ns, peer_ifname)

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add an address like "10.2.0.1/24" to an interface here."""
        address, _, prefix = cidr.partition("/")
        if not prefix:
            raise ValueError(f"address {cidr!r} needs a prefix length, like 10.2.0.1/24")
        with self.iproute() as ipr:
            ipr.addr("add", index=_index(ipr, ifname, self), address=address, prefixlen=int(prefix))

    def addresses(self, ifname: str | None = None) -> list[str]:
        """IPv4 addresses here as "a.b.c.d/len", of one interface or all of them."""
        with self.iproute() as ipr:
            spec = {} if ifname is None else {"index": _index(ipr, ifname, self)}
            return [
                f"{msg.get('address')}/{msg['prefixlen']}"
                for msg in ipr.addr("dump", **spec)
                if msg["family"] == socket.AF_INET
            ]

    def add_route(self, destination: str, *, gateway: str | None = None, ifname: str | None = None) -> None:
        """Add a route ("10.3.0.0/16" or "default") via a gateway and/or out of an interface."""
        spec: dict[str, object] = {"dst": destination}
        if gateway is not None:
            spec["gateway"] = gateway
        with self.iproute() as ipr:
            if ifname is not None:
                spec["oif"] = _index(ipr, ifname, self)
            ipr.route("add", **spec)

    # -- inside the namespace, in this process -----------------------------------------------

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` in a thread that has entered this namespace; return its result.

        What it creates (sockets) stays in this namespace; the calling thread never moves.
        """
        results: list[T] = []
        errors: list[BaseException] = []

        def body() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"setns into {self.path}: {os.strerror(code)}")
                finally:
                    os.close(fd)
                results.append(function())
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=body, name=f"netns-{self.label}", daemon=True)
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return results[0]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace (bind, connect, send from the test itself)."""
        return self.call(lambda: socket.socket(family, type, proto))

    def sysctl(self, key: str, value: str | None = None) -> str:
        """Read (or set, then read) a sysctl of this namespace: "net.ipv4.ip_forward"."""
        path = Path("/proc/sys", key if "/" in key else key.replace(".", "/"))

        def access() -> str:
            if value is not None:
                path.write_text(value)
            return path.read_text().strip()

        return self.call(access)

    def listening_ports(self, protocol: str = "tcp") -> set[int]:
        """Ports with a listening TCP socket (protocol="tcp") or a bound UDP socket ("udp") here."""
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
        state = "0A" if protocol == "tcp" else "07"  # TCP_LISTEN; UDP sockets sit in TCP_CLOSE

        def scan() -> set[int]:
            ports = set()
            for table in (protocol, protocol + "6"):
                try:
                    lines = Path(f"/proc/thread-self/net/{table}").read_text().splitlines()[1:]
                except FileNotFoundError:
                    continue
                for line in lines:
                    fields = line.split()
                    if fields[3] == state:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
            return ports

        return self.call(scan)

    def wait_listening(self, port: int, *, protocol: str = "tcp", timeout: float = 30.0) -> None:
        """Wait until something here listens on `port` (tcp) or has bound it (udp)."""
        wait_until(
            lambda: port in self.listening_ports(protocol),
            timeout=timeout,
            interval=0.05,
            message=f"{protocol} port {port} to be listening in {self.label}",
        )

    def tcp_connect(self, target: str | Addressable, port: int, *, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from here to target:port is accepted within `timeout`."""
        with self.socket() as sock:
            sock.settimeout(timeout)
            try:
                return sock.connect_ex((address_of(target), port)) == 0
            except TimeoutError:
                return False

    def ping(self, target: str | Addressable, *, count: int = 1, timeout: float = 2.0) -> bool:
        """Whether ping from here to target gets a reply: `count` requests a second apart, the last
        one given `timeout` seconds. Network errors ("Network is unreachable") count as no reply;
        a ping that could not run at all (bad argument, missing tool) raises CommandFailed."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}", address_of(target)]
        result = self.run(argv, check=False, timeout=count + timeout + 30.0)
        if result.returncode == 0:
            return True
        if result.returncode == 1 or any(error in result.stderr.lower() for error in _NETWORK_ERRORS):
            return False
        raise CommandFailed(self.where, result)

    def wait_reachable(self, target: str | Addressable, *, timeout: float = 30.0) -> None:
        """Wait until `target` answers a ping from here.

        Use this, not a single ping, for "reachable again" after heal() or rejoin(): a neighbour
        (ARP) entry that failed during the cut makes the first packets fail for a few seconds,
        as it would on real hosts.
        """
        address = address_of(target)
        wait_until(
            lambda: self.ping(address, timeout=1.0),
            timeout=timeout,
            interval=0.01,
            message=f"{address} to answer ping from {self.label}",
        )

    # -- programs ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"{self.name.split('-', 1)[0]} {self.label}"

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: Env | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command here to completion and return its exit status and text output.

        check=True (the default) raises CommandFailed on a non-zero exit, with stderr in the message;
        on timeout the command's process group is killed and CommandTimeout raised. `env` entries
        override the current environment (None unsets one).
        """
        return run_in_netns(
            self.path, argv, where=self.where, check=check, timeout=timeout, env=env, cwd=cwd, input=input
        )

    def start(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Env | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> LabProcess:
        """Start a long-running program here, in its own process group; the lab stops it at the end.

        `name` (default: the program's file name, made unique) names its log files in `logdir`.
        PYTHONUNBUFFERED=1 is set unless `env` says otherwise, so Python programs log as they go.
        """
        name = name or self._free_name(os.path.basename(argv[0]) if argv else "process")
        if any(process.name == name for process in self.processes):
            raise ValueError(f"{self.label} already has a process named {name!r}; pick another name")
        process = LabProcess(
            netns_path=self.path, where=self.where, name=name, argv=argv, logdir=self.logdir, env=env, cwd=cwd
        )
        self.processes.append(process)
        return process.start()

    def process(self, name: str) -> LabProcess:
        """The program started here under `name`."""
        for process in self.processes:
            if process.name == name:
                return process
        raise KeyError(f"{self.label} has no process named {name!r}")

    def stop_processes(self, timeout: float = 10.0) -> None:
        """Stop every program started here (SIGTERM all, then SIGKILL what is left at the deadline)."""
        stop_all(self.processes, timeout=timeout)

    def _free_name(self, base: str) -> str:
        taken = {process.name for process in self.processes}
        if base not in taken:
            return base
        suffix = 2
        while f"{base}-{suffix}" in taken:
            suffix += 1
        return f"{base}-{suffix}"


def _index(ipr: IPRoute, ifname: str, where: Namespace) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r} in {where.label} ({where.name})")
    return int(found[0])
