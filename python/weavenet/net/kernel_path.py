"""The kernel fast path's controller: which peers travel through the kernel, and why the others don't.

Per connection it chooses, in Weave Net's words, `fastdp` (the kernel VXLAN port, net/vxlan.py) or
`sleeve` (the Rust datapath's TAP). A peer goes through the kernel only when
  (a) neither side needs encryption for it (no password, or both trust each other's subnet),
  (b) it is a direct neighbour whose route is the connection itself (not relayed),
  (c) full-size heartbeats cross the kernel path in both directions (net/kernel_heartbeat.py);
otherwise, and within HEARTBEAT_TIMEOUT once the heartbeats stop, it is carried by the Rust
datapath, and it comes back by itself when they return. Switching means pinning the peer's MACs
(net/peer_macs.py) to the VXLAN port or unpinning them (the bridge then learns them on the TAP): a
frame takes one path or the other, never both, so nothing is delivered twice and TCP streams
survive the switch. Every decision is shown: status says `fastdp` or `sleeve` and, for sleeve,
why; /report and /metrics carry the same.

Shape (read top to bottom in `run`):
    run                 open the device (firewall first: the port never answers strangers)
    ├── heartbeats      every HEARTBEAT_INTERVAL to each candidate; every peer re-judged often
    ├── heartbeat reader the bridge's packet socket
    ├── local MACs      re-reads the bridge's FDB on netlink events, announces changes to neighbours
    └── reconciler      pins and the firewall's allow-list follow the decisions (in a thread)
Nothing here blocks the trio loop: netlink and iptables calls run in threads; nothing polls (the
counters are read when someone asks for them).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from pyroute2 import IPRoute

from weavenet.net import firewall, kernel_heartbeat, peer_macs, vxlan
from weavenet.net.bridge import BRIDGE_NAME, PlumbingError
from weavenet.net.bridge_events import BridgeEvents
from weavenet.net.kernel_heartbeat import Heartbeat, HeartbeatError, heartbeat_mac
from weavenet.net.peer_macs import AnnouncementError, PeerMacs
from weavenet.net.vxlan import PortInUse, Remote

if TYPE_CHECKING:
    import socket

    from weavenet.mesh.connection import Connection
    from weavenet.mesh.peer_name import PeerName
    from weavenet.mesh.router import Router
    from weavenet.mesh.routes import Routes

log = logging.getLogger(__name__)

FASTDP, SLEEVE = "fastdp", "sleeve"
HEARTBEAT_INTERVAL = 0.4
HEARTBEAT_TIMEOUT = 1.2  # no heartbeat (either way) for this long: back to sleeve ...
JUDGE_INTERVAL = 0.2  # ... noticed within this: a blocked kernel path is left within 1.4 s
HEARD_WINDOW = math.ceil(HEARTBEAT_TIMEOUT / HEARTBEAT_INTERVAL)  # our heartbeats the peer may miss
LOCAL_DEBOUNCE = 0.05  # a burst of table changes is read once
LOCAL_RESYNC = 30.0  # and the table is re-read this often even without events
VERIFY_INTERVAL = 30.0  # compare what is pinned with the device itself this often
RETRY_OPEN = 10.0  # a port in use is tried again this often
COUNTERS_FRESH = 0.5  # counters read less than this long ago are not read again
# Passing states, not verdicts: the path is being set up, or the mesh's routes are not computed yet
STARTING, WAITING, NO_ROUTE = "kernel path starting", "waiting for kernel heartbeat", "no route"
REASONS_OFF = {"heartbeat", "relayed", "unavailable"}  # the ways a fastdp peer can leave it (always exported)


def split_host(address: str) -> str:
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def _is_ipv4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return False


@dataclass
class PeerPath:
    """One connection's path: the facts it is judged on and the judgement."""

    conn: Connection
    remote: Remote
    candidate: bool = False
    reason: str = ""  # why not fastdp (a candidate's reason depends on its heartbeats)
    kind: str = ""  # the reason's metric label
    seq: int = 0  # our last heartbeat's number
    heard: int = 0  # their last heartbeat's number
    heard_at: float | None = None
    they_heard: int = 0  # the number of ours their last heartbeat says they heard
    up: bool = False
    lost_at: float | None = None  # when its heartbeats stopped (it was fastdp before)

    @property
    def peer(self) -> int:
        return int(self.conn.remote_name)


@dataclass
class KernelPathStats:
    fallbacks: Counter[str] = field(default_factory=Counter)  # a peer taken off fastdp, by reason
    bad_heartbeats: int = 0
    bad_announcements: int = 0
    port: vxlan.PortStats = field(default_factory=vxlan.PortStats)  # as last read
    foreign_dropped: int = 0  # datagrams from non-peers the firewall dropped, as last read
    read_at: float = -math.inf


class KernelPath:
    """The kernel path of one router: one VXLAN device, heartbeats, pins, the firewall's allow-list."""

    def __init__(
        self,
        router: Router,
        *,
        port: int,
        mtu: int,
        device_mtu: int,
        enabled: bool = True,
        disabled_reason: str = "disabled by --no-fastdp",
        local_host: str = "",
        tap: str,
        bridge: str = BRIDGE_NAME,
    ) -> None:
        self.router = router
        self.port = port
        self.mtu = mtu  # the overlay's (the bridge's): heartbeats are this size
        self.device_mtu = device_mtu
        self.enabled = enabled
        self.local_host = local_host or None
        self.tap = tap
        self.bridge = bridge
        self.open = False
        self.problem = "" if enabled else disabled_reason
        self.peers: dict[PeerName, PeerPath] = {}
        self.macs = PeerMacs()
        self.local: set[str] = set()
        self.pinned: dict[str, Remote] = {}
        self.allowed: set[str] | None = None
        self.stats = KernelPathStats()
        self.hb_mac = heartbeat_mac(int(router.name))
        self._sock: socket.socket | None = None
        self._dirty = trio.Event()
        self._verify_due = 0.0
        router.subscribe_connections(self._on_connection)
        router.subscribe_routes(self._on_routes)
        router.set_overlay_handler(self._on_overlay_control)

    # --- the task ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            await trio.sleep_forever()
        await self._try_open()
        task_status.started()  # the router may serve now: its intro says whether we offer the path
        while not self.open:
            await trio.sleep(RETRY_OPEN)
            await self._try_open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._read_heartbeats)
                nursery.start_soon(self._watch_local_macs)
                nursery.start_soon(self._reconcile_loop)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close)

    async def _try_open(self) -> None:
        try:
            self._sock = await trio.to_thread.run_sync(self._open)
        except PortInUse as exc:
            self._fail(str(exc))
        except (PlumbingError, firewall.FirewallError, OSError) as exc:
            self._fail(f"kernel path failed: {exc}")
        else:
            self.open, self.problem = True, ""
            self.router.kernel_port = self.port
            for path in self.peers.values():
                self._judge(path)

    def _fail(self, problem: str) -> None:
        if problem != self.problem:
            log.warning("kernel path off: %s; all peers on sleeve (retrying every %.0f s)", problem, RETRY_OPEN)
        self.problem = problem
        self.router.kernel_port = 0

    def _open(self) -> socket.socket:
        """Blocking: the firewall (drop all), the device, our heartbeat MAC, the heartbeat socket."""
        firewall.guard_kernel_port(self.port)
        try:
            firewall.allow_kernel_peers(set())
            vxlan.open_device(self.port, mtu=self.device_mtu, local=self.local_host, bridge=self.bridge)
            vxlan.isolate_port(self.tap)
            with IPRoute() as ipr:
                vxlan.add_local(ipr, self.hb_mac, bridge=self.bridge)
            return kernel_heartbeat.open_socket(self.bridge)
        except BaseException:
            vxlan.close_device(self.port)
            firewall.close_kernel_port()  # the port may be someone else's: our drop rule must not stay
            raise

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            vxlan.close_device(self.port)
            with IPRoute() as ipr:
                vxlan.remove_local(ipr, self.hb_mac, bridge=self.bridge)
            firewall.close_kernel_port()
        except (PlumbingError, firewall.FirewallError) as exc:
            log.warning("kernel path: could not remove everything: %s", exc)
        self.open = False

    # --- the mesh's view → decisions ---

    def _on_connection(self, conn: Connection, up: bool) -> None:
        name = conn.remote_name
        if not up:
            if self.peers.get(name) is not None and self.peers[name].conn is conn:
                del self.peers[name]
                self.macs.drop(int(name))
                self._dirty.set()
            return
        path = PeerPath(conn, Remote(split_host(conn.remote_address), conn.intro.kernel_port))
        self.peers[name] = path
        self.macs.drop(int(name))  # a new connection starts with the peer's full set
        self._judge(path)
        if self.open and conn.intro.kernel_port:
            self._announce(conn, full=True, added=self.local)

    def _on_routes(self, routes: Routes) -> None:
        for path in self.peers.values():
            self._judge(path)

    def _judge(self, path: PeerPath, now: float | None = None) -> None:
        """Decide a peer's path from the facts; reflect the decision where status looks."""
        now = time.monotonic() if now is None else now
        hop = self.router.routes.unicast.get(path.conn.remote_name)
        if path.conn.encrypted and path.conn.untrusted:
            candidate, reason, kind = False, "encrypted", "encrypted"
        elif not self.enabled:
            candidate, reason, kind = False, self.problem, "disabled"
        elif not self.open:
            candidate, reason, kind = False, self.problem or STARTING, "unavailable"
        elif not path.remote.port:
            candidate, reason, kind = False, "peer offers no kernel path", "peer"
        elif not _is_ipv4(path.remote.address):
            candidate, reason, kind = False, "not an IPv4 underlay (the kernel path is IPv4 only)", "peer"
        elif hop != path.conn.remote_name:
            via = self._nickname(hop) if hop is not None else None
            candidate, reason, kind = False, f"relayed via {via}" if via else NO_ROUTE, "relayed"
        else:
            candidate, reason, kind = True, "", ""
        up = candidate and self._heartbeats_pass(path, now)
        if path.up and not up:
            path.lost_at = now if candidate else None
        if candidate and not up:
            if path.lost_at is not None:
                reason, kind = f"kernel heartbeat timed out {now - path.lost_at:.0f} s ago", "heartbeat"
            else:
                reason, kind = WAITING, "waiting"
        if path.up and not up:
            log.info("%s: kernel path down: sleeve (%s)", path.conn, reason)
            self.stats.fallbacks[kind] += 1
        elif up and not path.up:
            log.info("%s: kernel path up: fastdp", path.conn)
        changed = (candidate, up) != (path.candidate, path.up)
        path.candidate, path.up, path.reason, path.kind = candidate, up, reason, kind
        attrs = {k: v for k, v in path.conn.attrs.items() if k != "fallback"}
        attrs["name"] = FASTDP if up else SLEEVE
        if not up:
            attrs["fallback"] = reason
        self.router.set_connection_attrs(path.conn.remote_name, attrs)
        if changed:
            self._dirty.set()

    def _heartbeats_pass(self, path: PeerPath, now: float) -> bool:
        return (
            path.heard_at is not None
            and now - path.heard_at < HEARTBEAT_TIMEOUT
            and path.they_heard > 0
            and path.they_heard >= path.seq - HEARD_WINDOW
        )

    def _nickname(self, name: PeerName) -> str:
        record = self.router.topology.get(name)
        return f"{name}({record.nickname})" if record is not None and record.nickname else str(name)

    # --- heartbeats ---

    async def _heartbeats(self) -> None:
        next_send = 0.0
        while True:
            now = time.monotonic()
            send = now >= next_send
            if send:
                next_send = now + HEARTBEAT_INTERVAL
            for path in list(self.peers.values()):
                self._judge(path, now)
                # Only once its MAC is pinned: an unpinned one would be flooded to every port.
                if send and path.candidate and self.pinned.get(heartbeat_mac(path.peer)) == path.remote:
                    path.seq += 1
                    self._send(Heartbeat(int(self.router.name), path.peer, path.conn.uid, path.seq, path.heard))
            await trio.sleep(JUDGE_INTERVAL)

    def _send(self, heartbeat: Heartbeat) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send(heartbeat.frame(self.mtu))
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                log.warning("kernel path: cannot send a heartbeat: %s", exc)

    async def _read_heartbeats(self) -> None:
        assert self._sock is not None
        sock, us = self._sock, int(self.router.name)
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    frame = sock.recv(65536)
                except BlockingIOError:
                    break
                try:
                    heartbeat = kernel_heartbeat.parse(frame, receiver=us)
                except HeartbeatError as exc:
                    self.stats.bad_heartbeats += 1
                    log.debug("kernel path: ignored a frame: %s", exc)
                    continue
                self._heard(heartbeat)

    def _heard(self, heartbeat: Heartbeat) -> None:
        path = next((p for p in self.peers.values() if p.peer == heartbeat.sender), None)
        if path is None or heartbeat.conn_uid != path.conn.uid or not path.candidate:
            self.stats.bad_heartbeats += 1  # a peer we are not probing, or an older connection's
            return
        if heartbeat.seq <= path.heard and path.heard_at is not None:
            return  # reordered or duplicated on the underlay
        path.heard, path.heard_at, path.they_heard = heartbeat.seq, time.monotonic(), heartbeat.heard
        if not path.up:
            self._judge(path)  # switch back at once, not at the next tick

    # --- MACs ---

    async def _watch_local_macs(self) -> None:
        overlay_ports = {self.tap, vxlan.device_name(self.port)}

        def read() -> set[str]:
            with IPRoute() as ipr:
                return vxlan.local_macs(ipr, overlay_ports, bridge=self.bridge)

        events = BridgeEvents()
        try:
            while True:
                try:
                    local = await trio.to_thread.run_sync(read)
                except (PlumbingError, OSError) as exc:
                    log.warning("kernel path: cannot read the bridge's MACs: %s", exc)
                    local = self.local
                if local != self.local:
                    self._local_changed(local)
                with trio.move_on_after(LOCAL_RESYNC):
                    await events.changed()
                await trio.sleep(LOCAL_DEBOUNCE)
        finally:
            events.close()

    def _local_changed(self, local: set[str]) -> None:
        added, removed = local - self.local, self.local - local
        self.local = local
        for path in self.peers.values():
            if path.remote.port:
                self._announce(path.conn, full=False, added=added, removed=removed)
        self._dirty.set()  # a MAC that is ours now is never pinned to a peer

    def _announce(self, conn: Connection, *, full: bool, added: set[str], removed: set[str] = frozenset()) -> None:
        for announcement in peer_macs.announcements(full, added, removed):
            conn.send_overlay_control(peer_macs.SUBTAG, peer_macs.encode(announcement))

    def _on_overlay_control(self, conn: Connection, subtag: int, payload: bytes) -> None:
        if subtag != peer_macs.SUBTAG:
            log.debug("%s: overlay control subtag %d: not ours, ignored", conn, subtag)
            return
        path = self.peers.get(conn.remote_name)
        if path is None or path.conn is not conn:
            return
        try:
            self.macs.apply(path.peer, peer_macs.decode(payload))
        except AnnouncementError as exc:
            self.stats.bad_announcements += 1
            log.warning("%s: bad MAC announcement ignored: %s", conn, exc)
            return
        if path.up:
            self._dirty.set()

    # --- making it so ---

    def desired(self) -> tuple[dict[str, Remote], set[str]]:
        """What should be pinned (heartbeat MACs of candidates, MACs of fastdp peers), and who may
        send to the kernel port (the candidates)."""
        pins = {heartbeat_mac(p.peer): p.remote for p in self.peers.values() if p.candidate}
        up = {p.peer: p.remote for p in self.peers.values() if p.up}
        owners = self.macs.owners(set(up), self.local | {self.hb_mac})
        pins |= {mac: up[owner] for mac, owner in owners.items()}
        return pins, {p.remote.address for p in self.peers.values() if p.candidate}

    async def _reconcile_loop(self) -> None:
        while True:
            with trio.move_on_after(VERIFY_INTERVAL):
                await self._dirty.wait()
            self._dirty = trio.Event()
            verify = time.monotonic() >= self._verify_due
            pins, allowed = self.desired()
            try:
                self.pinned = await trio.to_thread.run_sync(self._apply, pins, allowed, verify)
                self.allowed = allowed
            except (PlumbingError, firewall.FirewallError, OSError) as exc:
                log.warning("kernel path: could not apply the forwarding state: %s", exc)
                self._verify_due = 0.0  # read the device back next time
                await trio.sleep(1.0)
                continue
            if verify:
                self._verify_due = time.monotonic() + VERIFY_INTERVAL

    def _apply(self, pins: dict[str, Remote], allowed: set[str], verify: bool) -> dict[str, Remote]:
        """Blocking: make the device's entries `pins` and the allow-list `allowed`; returns the
        entries now in place. With `verify`, the device is read back rather than trusted."""
        if verify or allowed != self.allowed:
            firewall.allow_kernel_peers(allowed)
        with IPRoute() as ipr:
            current = vxlan.pinned(ipr, self.port) if verify else dict(self.pinned)
            if verify:
                vxlan.add_local(ipr, self.hb_mac, bridge=self.bridge)
            for mac in current.keys() - pins.keys():
                vxlan.unpin(ipr, self.port, mac)
                del current[mac]
            for mac, remote in pins.items():
                if current.get(mac) != remote:
                    vxlan.pin(ipr, self.port, mac, remote)
                    current[mac] = remote
        return current

    async def read_counters(self) -> None:
        """Refresh the device's and the firewall's counters (for /report and /metrics; in a thread)."""
        if not self.open or time.monotonic() - self.stats.read_at < COUNTERS_FRESH:
            return

        def read() -> tuple[vxlan.PortStats, int]:
            with IPRoute() as ipr:
                port = vxlan.port_stats(ipr, self.port)
            return port, firewall.kernel_dropped()

        try:
            self.stats.port, self.stats.foreign_dropped = await trio.to_thread.run_sync(read)
            self.stats.read_at = time.monotonic()
        except (PlumbingError, firewall.FirewallError, OSError) as exc:
            log.debug("kernel path: counters not read: %s", exc)
