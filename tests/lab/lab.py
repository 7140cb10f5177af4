"""The lab: N hosts on one switch, built from network namespaces on this machine.

    switch namespace  <id>-switch   bridge br0 (no address), one port per host, named after the host
                                    nft table `bridge wnlab` for cut/isolate (tests.lab.firewall)
    host namespaces   <id>-h1 ...   underlay interface eth0 = 10.251.<x>.<n>/24, lo up, nothing else
    containers        <id>-h1-c1    only lo; weavenet's attach code (or add_veth) plumbs the rest

Labs are isolated from each other and from the machine: each has its own switch, so their subnets
never meet (the third octet is drawn per lab only so that captures from parallel labs are told
apart). Everything a lab creates is removed by close(): its programs (whole process groups, plus any
stray process found in its namespaces), then its namespaces (and the links and tables inside them),
then its scratch directory if it made one. This module must never configure the machine's own
network namespace, and never leave a lab half-closed without the sweeper being able to finish it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from tests.lab import sweep, teardown
from tests.lab.firewall import SwitchFirewall
from tests.lab.iperf import IperfResult, iperf3
from tests.lab.netns import Namespace, VethPair
from tests.lab.process import LabProcess, stop_all

UNDERLAY_INTERFACE = "eth0"  # in each host
SWITCH_BRIDGE = "br0"  # in the switch namespace
UNDERLAY_NET = ipaddress.IPv4Network("10.251.0.0/16")  # each lab takes one /24 of it
HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,9}")  # also the switch port name, so it must fit IFNAMSIZ
RESERVED_NAMES = frozenset({"switch", SWITCH_BRIDGE, "lo"})
CONTAINER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")


class Host(Namespace):
    """A lab host: a namespace on the switch with an underlay address, and its containers."""

    def __init__(self, lab: Lab, name: str, number: int, address: str) -> None:
        super().__init__(f"{lab.id}-{name}", label=name, logdir=lab.workdir / name)
        self.lab = lab
        self.number = number  # the last octet of its address
        self.address = address  # underlay IPv4 address, e.g. "10.251.7.1"
        self.interface = UNDERLAY_INTERFACE
        self.containers: dict[str, Container] = {}

    def add_container(self, name: str) -> Container:
        """A namespace standing for a container on this host (only lo; nothing attached yet)."""
        if CONTAINER_NAME.fullmatch(name) is None:
            raise ValueError(f"container name {name!r} must match {CONTAINER_NAME.pattern}")
        if name in self.containers:
            raise ValueError(f"{self.label} already has a container named {name!r}")
        container = Container(self, name)
        self.containers[name] = container  # registered first: close() removes even a half-made one
        container.create()
        return container

    def container(self, name: str) -> Container:
        try:
            return self.containers[name]
        except KeyError:
            raise KeyError(f"{self.label} has no container named {name!r}") from None

    def add_veth_to(
        self,
        container: Namespace,
        host_ifname: str,
        container_ifname: str,
        *,
        bridge: str | None = None,
        mtu: int | None = None,
    ) -> VethPair:
        """A veth pair from this host to a container (both ends up, no addresses), host end
        optionally enslaved to `bridge` in this host (create it first with add_bridge)."""
        return self.add_veth(host_ifname, container, container_ifname, bridge=bridge, mtu=mtu)


class Container(Namespace):
    """A namespace attached to a host as weavenet attaches a Docker container."""

    def __init__(self, host: Host, name: str) -> None:
        super().__init__(
            f"{host.lab.id}-{host.label}-{name}",
            label=f"{host.label}-{name}",
            logdir=host.lab.workdir / f"{host.label}-{name}",
        )
        self.host = host
        self.short_name = name


class Lab:
    """N hosts on a switch. Use as `with Lab(hosts=3) as lab:` or start()/close() (fixtures do).

    `hosts` is a count (hosts named h1..hN) or a list of names. `mtu` is the underlay MTU.
    `workdir` keeps the programs' logs (kept after close); by default a scratch directory is made
    and removed with the lab.
    """

    def __init__(
        self,
        hosts: int | Sequence[str] = 3,
        *,
        mtu: int = 1500,
        workdir: Path | str | None = None,
    ) -> None:
        names = [f"h{n}" for n in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        for name in names:
            _check_host_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"underlay MTU {mtu} out of range 68..65535")
        self.mtu = mtu
        self.id = ""  # set by start(): "wn" + 6 hex digits
        self.subnet = ipaddress.IPv4Network("0.0.0.0/32")
        self.hosts: list[Host] = []
        self._switch: Namespace | None = None
        self._firewall: SwitchFirewall | None = None
        self._initial_hosts = names
        self._given_workdir = Path(workdir) if workdir is not None else None
        # Logs and scratch files; a fresh temporary directory is only chosen by start().
        self.workdir = self._given_workdir or Path("/nonexistent/lab-not-started")
        self._ownership: sweep.Ownership | None = None
        self._closed = False
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        return f"<Lab {self.id or '(not started)'} {self.subnet} hosts={[h.label for h in self.hosts]}>"

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Lab:
        """Build the switch and the hosts. On any failure, removes what it built and re-raises."""
        if self.id:
            raise RuntimeError(f"{self!r} was already started")
        self._ownership = self._claim_id()
        self._owner_pid = os.getpid()
        self.id = self._ownership.lab_id
        teardown.register(self)
        try:
            if self._given_workdir is None:
                self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.id}-"))
                self._ownership.record(workdir=self.workdir)
            else:
                self.workdir.mkdir(parents=True, exist_ok=True)
            self.subnet = _subnet_for(self.id)
            self._switch = Namespace(f"{self.id}-switch", label="switch", logdir=self.workdir / "switch")
            self._switch.create()
            self._switch.add_bridge(SWITCH_BRIDGE, mtu=self.mtu)
            self._firewall = SwitchFirewall(self._switch)
            self._firewall.apply()
            for name in self._initial_hosts:
                self.add_host(name)
        except BaseException:
            self.close()
            raise
        return self

    def _claim_id(self) -> sweep.Ownership:
        present = set(sweep.lab_namespaces())
        for _ in range(100):
            lab_id = sweep.new_lab_id()
            if lab_id in present:
                continue
            if (ownership := sweep.Ownership.claim(lab_id)) is not None:
                return ownership
        raise RuntimeError(f"could not claim a free lab id in {sweep.LOCK_DIR}")

    def add_host(self, name: str | None = None) -> Host:
        """Add a host to the switch (default name: h<next number>) and return it."""
        switch = self.switch
        number = max((host.number for host in self.hosts), default=0) + 1
        name = name or f"h{number}"
        _check_host_name(name)
        if any(host.label == name for host in self.hosts):
            raise ValueError(f"{self!r} already has a host named {name!r}")
        if number > 254:
            raise ValueError(f"{self!r} is full: a /24 underlay holds 254 hosts")
        host = Host(self, name, number, str(self.subnet.network_address + number))
        self.hosts.append(host)  # registered first: close() removes even a half-made host
        host.create()
        # The switch end is named after the host; the host end is eth0 in every host.
        switch.add_veth(name, host, UNDERLAY_INTERFACE, mtu=self.mtu, bridge=SWITCH_BRIDGE, up=False)
        host.add_address(UNDERLAY_INTERFACE, f"{host.address}/{self.subnet.prefixlen}")
        host.set_link(UNDERLAY_INTERFACE, up=True)
        switch.set_link(name, up=True)
        return host

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop every program, remove every namespace and the scratch directory. Idempotent.

        Programs get SIGTERM and `timeout` seconds before SIGKILL. Ctrl-C during close is held back
        until the lab is gone (twice: interrupt now and leave the rest to the sweeper).
        """
        if self._closed or self._ownership is None:
            self._closed = True
            return
        if os.getpid() != self._owner_pid:
            return  # a forked copy of the owner (pyroute2 helper): the lab is not ours to close
        with teardown.interrupts_deferred():
            namespaces = [ns.name for ns in self.namespaces()]
            try:
                stop_all(self.processes(), timeout=timeout)
            finally:
                # Whatever the programs did, nothing may outlive the lab: stray processes (daemons
                # that left their process group) are killed by namespace, then the names removed.
                sweep.kill_namespace_processes(namespaces, timeout=timeout)
                sweep.remove_namespaces(namespaces)
                if self._given_workdir is None:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                self._ownership.release()
                self._closed = True
                teardown.unregister(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def switch(self) -> Namespace:
        """The switch namespace (bridge br0, one port per host, the fault rules)."""
        if self._switch is None or self._closed:
            raise RuntimeError(f"{self!r} is not running")
        return self._switch

    @property
    def firewall(self) -> SwitchFirewall:
        """The switch's fault rules (cut/heal/isolate/rejoin use them; ruleset() shows counters)."""
        return self._faults()

    # -- looking things up -------------------------------------------------------------------

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.label == name:
                return host
        raise KeyError(f"{self!r} has no host named {name!r}")

    def namespaces(self) -> list[Namespace]:
        """Every namespace of the lab: containers, hosts, then the switch."""
        found: list[Namespace] = [c for host in self.hosts for c in host.containers.values()]
        found += self.hosts
        if self._switch is not None:
            found.append(self._switch)
        return found

    def processes(self) -> list[LabProcess]:
        """Every program started in any of the lab's namespaces."""
        return [process for ns in self.namespaces() for process in ns.processes]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def _resolve(self, host: Host | str) -> Host:
        if isinstance(host, str):
            return self.host(host)
        if host.lab is not self:
            raise ValueError(f"{host!r} belongs to another lab")
        return host

    # -- faults (rules in the switch: tests.lab.firewall) ----------------------------------------

    def _faults(self) -> SwitchFirewall:
        if self._firewall is None or self._closed:
            raise RuntimeError(f"{self!r} is not running")
        return self._firewall

    def cut(self, a: Host | str, b: Host | str) -> None:
        """Drop everything between two hosts, both ways; links stay up, others unaffected. Idempotent."""
        self._faults().cut(self._resolve(a).label, self._resolve(b).label)

    def heal(self, a: Host | str, b: Host | str) -> None:
        """Undo cut(a, b). Idempotent; an isolated host stays isolated."""
        self._faults().heal(self._resolve(a).label, self._resolve(b).label)

    def heal_all(self) -> None:
        """Undo every cut, isolation and block."""
        self._faults().heal_all()

    def block_udp(self, a: Host | str, b: Host | str, udp_port: int) -> None:
        """Drop UDP datagrams to `udp_port` between two hosts, both ways; all else passes. Idempotent."""
        self._faults().block_udp(self._resolve(a).label, self._resolve(b).label, udp_port)

    def unblock_udp(self, a: Host | str, b: Host | str, udp_port: int) -> None:
        self._faults().unblock_udp(self._resolve(a).label, self._resolve(b).label, udp_port)

    def is_cut(self, a: Host | str, b: Host | str) -> bool:
        return self._faults().is_cut(self._resolve(a).label, self._resolve(b).label)

    def isolate(self, host: Host | str) -> None:
        """Drop everything to and from the host on the underlay (all other hosts). Idempotent."""
        self._faults().isolate(self._resolve(host).label)

    def rejoin(self, host: Host | str) -> None:
        """Undo isolate(host); cuts made with cut() stay. Idempotent."""
        self._faults().rejoin(self._resolve(host).label)

    def is_isolated(self, host: Host | str) -> bool:
        return self._resolve(host).label in self._faults().isolated

    # -- measuring ---------------------------------------------------------------------------

    def iperf3(
        self,
        server: Host | str,
        client: Host | str,
        *,
        seconds: int = 2,
        udp: bool = False,
        bitrate: str | None = None,
        parallel: int = 1,
        reverse: bool = False,
        port: int = 5201,
        extra_args: Sequence[str] = (),
        connect_timeout: float = 10.0,
    ) -> IperfResult:
        """Throughput from `client` to `server` (the reverse with reverse=True) over the underlay.

        See tests.lab.iperf.iperf3 for the options; it also works between containers.
        """
        server, client = self._resolve(server), self._resolve(client)
        return iperf3(
            server,
            client,
            server.address,
            seconds=seconds,
            udp=udp,
            bitrate=bitrate,
            parallel=parallel,
            reverse=reverse,
            port=port,
            extra_args=extra_args,
            connect_timeout=connect_timeout,
        )

    def describe(self) -> str:
        """A few lines for a failing test's output: hosts, addresses, faults, programs."""
        lines = [f"lab {self.id} subnet {self.subnet} mtu {self.mtu} workdir {self.workdir}"]
        for host in self.hosts:
            faults = []
            if self._firewall is not None and host.label in self._firewall.isolated:
                faults.append("ISOLATED")
            if self._firewall is not None and (peers := self._firewall.cut_from(host.label)):
                faults.append("cut from " + ",".join(peers))
            lines.append(f"  {host.label} {host.address} netns={host.name} {' '.join(faults)}".rstrip())
            for ns in [host, *host.containers.values()]:
                lines += [f"    {process!r}" for process in ns.processes]
        return "\n".join(lines)


def _check_host_name(name: str) -> None:
    if HOST_NAME.fullmatch(name) is None:
        raise ValueError(f"host name {name!r} must match {HOST_NAME.pattern} (it names a switch port)")
    if name in RESERVED_NAMES:
        raise ValueError(f"host name {name!r} is reserved (the switch uses {sorted(RESERVED_NAMES)})")


def _subnet_for(lab_id: str) -> ipaddress.IPv4Network:
    """The lab's /24 of UNDERLAY_NET, picked by the lab id's first byte."""
    third_octet = int(lab_id[2:4], 16)
    return ipaddress.IPv4Network((int(UNDERLAY_NET.network_address) + (third_octet << 8), 24))
