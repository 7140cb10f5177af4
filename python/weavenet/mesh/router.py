"""The mesh router: accepts and dials control connections and keeps topology, routes and gossip.

Shape of the task tree (read top to bottom in `Router.serve`):
    serve
    ├── accept loop (one per listening socket)   throttled; each accepted stream → a connection task
    ├── connection maker loop                    dials due targets → a connection task each
    ├── topology announcer                       batches our record changes, GCs, gossips them
    ├── anti-entropy                             every channel's full state to random neighbours
    ├── route notifier                           debounced route-change callbacks (datapath)
    └── connection tasks                         handshake → intro → add → Connection.run → remove
All state lives on the trio loop and changes synchronously between awaits, so no locks are
needed. Nothing here blocks the loop (the store is small local sqlite), nothing logs secrets,
and every connection that ends leaves one log line saying why.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Any

import trio

from weavenet.mesh import wire
from weavenet.mesh.connection import Connection, ConnectionTimings, new_conn_id, tie_break
from weavenet.mesh.connection_maker import ConnectionMaker, Failure, LiveConnection, TargetState, split_address
from weavenet.mesh.gossip import GossipChannel, Gossiper, GossipHub
from weavenet.mesh.handshake import MAX_VERSION, MIN_VERSION, HandshakeError, MeshChannel, handshake
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.routes import UNKNOWN_PEER, Routes, compute_routes
from weavenet.mesh.topology import MergeResult, Topology, is_placeholder
from weavenet.mesh.topology_gossip import CHANNEL as TOPOLOGY_CHANNEL
from weavenet.mesh.topology_gossip import TopologyGossipData, TopologyGossiper

if TYPE_CHECKING:
    from weavenet._fastdp import MeshKey
    from weavenet.store import Store

log = logging.getLogger("weavenet.mesh")

PROTOCOL = "weave"
TARGETS_KEY = "targets"
ALL_CONNECTION_STATES = ("established", "pending", "retrying", "failed", "connecting")
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_HELP_MESSAGES = "Gossip messages sent and received, by kind."
_HELP_BYTES = "Gossip bytes sent and received, by kind."
_HELP_DROPPED = "Gossip messages dropped (unicast backlog full, no route, oversized)."


@dataclass(frozen=True)
class MeshTimings:
    """Every interval the mesh uses, in seconds. Defaults are Weave Net's except the heartbeat:
    Weave Net's 30 s heartbeat and 60 s read deadline left a dead link in the routes for a minute;
    a 5 s heartbeat costs a few bytes and notices a partition in 20 s. Tests use `fast()`."""

    heartbeat: float = 5.0
    read_timeout: float = 20.0  # a connection with nothing received for this long is dead
    handshake_timeout: float = 10.0
    dial_timeout: float = 10.0
    gossip_interval: float = 30.0  # anti-entropy
    topology_batch: float = 1.0  # our own record changes are batched this long before gossip
    route_debounce: float = 0.1
    backoff_base: float = 2.0
    backoff_cap: float = 360.0
    reset_after: float = 60.0  # a connection that lived this long is redialled at once when it drops
    close_timeout: float = 2.0
    accept_burst: int = 20  # accept throttle: bucket size ...
    accept_refill: float = 0.05  # ... and one token back per this many seconds
    max_pending_handshakes: int = 64  # inbound connections still in their handshake

    @classmethod
    def fast(cls) -> MeshTimings:
        """Short timings for tests on loopback."""
        return cls(
            heartbeat=0.5,
            read_timeout=2.0,
            handshake_timeout=2.0,
            dial_timeout=2.0,
            gossip_interval=1.0,
            topology_batch=0.02,
            route_debounce=0.01,
            backoff_base=0.2,
            backoff_cap=2.0,
            reset_after=2.0,
            close_timeout=0.5,
            accept_refill=0.005,
        )


@dataclass
class _Rejected:
    reason: str
    failure: Failure = Failure.TRANSIENT


@dataclass
class _Listeners:
    routes: list[Callable[[Routes], None]] = field(default_factory=list)
    peer_gone: list[Callable[[PeerName], None]] = field(default_factory=list)
    connections: list[Callable[[Connection, bool], None]] = field(default_factory=list)
    overlay_control: Callable[[Connection, int, bytes], None] | None = None


def _random_uid() -> int:
    return secrets.randbits(64) or 1


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remote_address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown:0"
    return _format_address(str(host), int(port))


def _dial_error(exc: BaseException) -> str:
    """One line for a failed dial: the OS's words (trio wraps them as "all attempts ... failed")."""
    if isinstance(exc, trio.TooSlowError):
        return "connection timed out"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            words = cause.strerror.rpartition(": ")[2] or cause.strerror
            return words[0].lower() + words[1:]
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[-1]  # trio: one error per address tried; the last says most
            continue
        cause = cause.__cause__
    return str(exc)


def _notify(callback: Callable[[Any], None], value: object) -> None:
    """Call a subscriber; a bug in one must not stop the mesh (it is logged with its traceback)."""
    try:
        callback(value)
    except Exception:
        log.exception("subscriber %r failed (a bug in that subsystem)", callback)


def _failure_for(reason: str) -> Failure:
    return Failure.AUTH if "password" in reason or "encryption" in reason else Failure.TRANSIENT


class Router:
    """One peer of the mesh. Construct, then run `serve` in a nursery; the API calls the rest."""

    def __init__(
        self,
        *,
        name: PeerName,
        nickname: str,
        listen_host: str,
        port: int,
        mesh_key: MeshKey | None,
        store: Store,
        conn_limit: int = 200,
        discovery: bool = True,
        trusted_subnets: Sequence[IPv4Network] = (),
        timings: MeshTimings = MeshTimings(),
        auto_establish: bool = True,
        data_port: int = 0,
        kernel_port: int = 0,
        overlays: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.nickname = nickname
        self.listen_host = listen_host
        self.port = port
        self.mesh_key = mesh_key
        self.store = store
        self.conn_limit = conn_limit
        self.discovery = discovery
        self.trusted_subnets = tuple(trusted_subnets)
        self.timings = timings
        # Until the datapath reports a link established, a control link counts as one.
        self.auto_establish = auto_establish
        self.data_port = data_port  # told to peers in the intro, so they know where to send data
        self.kernel_port = kernel_port  # likewise for the kernel fast path (0: we offer none)
        self.overlays = overlays
        self.uid = _random_uid()
        self.topology = Topology(name, nickname, self.uid)
        self._connections: dict[PeerName, Connection] = {}
        self._maker = ConnectionMaker(
            port=port,
            discovery=discovery,
            backoff_base=timings.backoff_base,
            backoff_cap=timings.backoff_cap,
            reset_after=timings.reset_after,
        )
        self._hub = GossipHub(name, lambda: self.routes, gossip_interval=lambda: self.timings.gossip_interval)
        self._topology_channel = self._hub.register(
            TOPOLOGY_CHANNEL, TopologyGossiper(self.topology, self._on_topology_merge)
        )
        self._routes = Routes.empty(name)
        self._routes_dirty = True
        self._routes_notified = True
        self._listeners = _Listeners()
        self._announce: set[PeerName] = set()
        self._gc_pending = False
        self._pending_handshakes = 0
        self._maker_wake = trio.Event()
        self._announce_wake = trio.Event()
        self._routes_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.routes_changed = trio.Event()  # set (and replaced) after each route change notification
        self.listening = False

    # ---------------------------------------------------------------------------------------------
    # Running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the mesh port and run the mesh until cancelled; connections close on the way out."""
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host or None)
        except OSError as exc:
            where = _format_address(self.listen_host or "*", self.port)
            raise OSError(exc.errno, f"cannot listen for mesh connections on {where}: {exc.strerror}") from exc
        saved = self.store.get_json(TARGETS_KEY, [])
        if isinstance(saved, list) and saved:
            errors = self._maker.connect([str(t) for t in saved], replace=False, now=trio.current_time())
            for error in errors:
                log.warning("ignoring a persisted target: %s", error)
            log.info("reconnecting to persisted targets: %s", ", ".join(self._maker.direct_targets()))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)
                nursery.start_soon(self._maker_loop)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._anti_entropy_loop)
                nursery.start_soon(self._routes_loop)
                self.listening = True
                log.info(
                    "mesh router %s(%s) listening on %s",
                    self.name,
                    self.nickname,
                    _format_address(self.listen_host or "*", self.port),
                )
                task_status.started()
        finally:
            self.listening = False
            self._nursery = None
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            log.info("mesh router %s stopped", self.name)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        tokens = float(self.timings.accept_burst)
        last = trio.current_time()
        async with listener:
            while True:
                now = trio.current_time()
                tokens = min(float(self.timings.accept_burst), tokens + (now - last) / self.timings.accept_refill)
                last = now
                if tokens < 1:
                    await trio.sleep((1 - tokens) * self.timings.accept_refill)
                    continue
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                        raise
                    log.error("cannot accept mesh connections: %s; retrying in 0.1s", os.strerror(exc.errno or 0))
                    await trio.sleep(0.1)
                    continue
                tokens -= 1
                address = _remote_address(stream)
                if self._pending_handshakes >= self.timings.max_pending_handshakes:
                    log.warning("<-[%s] refused: %d handshakes already pending", address, self._pending_handshakes)
                    await stream.aclose()
                    continue
                if len(self._connections) >= self.conn_limit:
                    log.warning("<-[%s] refused: connection limit (%d) reached", address, self.conn_limit)
                    await stream.aclose()
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._run_stream, stream, False, None, address)

    async def _dial(self, address: str) -> None:
        host, port = split_address(address)
        log.info("->[%s] attempting connection", address)
        local = self.listen_host if self.listen_host and self.listen_host not in ("0.0.0.0", "::") else None
        try:
            with trio.fail_after(self.timings.dial_timeout):
                stream = await trio.open_tcp_stream(host, port, local_address=local)
        except (OSError, trio.TooSlowError) as exc:
            reason = _dial_error(exc)
            log.info("->[%s] connection attempt failed: %s", address, reason)
            self._maker.attempt_failed(address, reason, Failure.TRANSIENT, trio.current_time())
            self._wake_maker()
            return
        await self._run_stream(stream, True, address, _remote_address(stream))

    async def _run_stream(self, stream: trio.SocketStream, outbound: bool, target: str | None, address: str) -> None:
        """One connection from TCP stream to close: handshake, intro, add, run, remove."""
        arrow = "->" if outbound else "<-"
        label = f"{arrow}[{address}]"
        our_conn_id = new_conn_id()
        trusted = self._trusts(address)
        intro = wire.Intro(
            self.name, self.nickname, self.uid, our_conn_id, trusted, self.overlays, self.data_port, self.kernel_port
        )
        channel: MeshChannel | None = None
        conn: Connection | None = None
        reason = "router shutting down"
        failure = Failure.TRANSIENT
        try:
            if not outbound:
                self._pending_handshakes += 1
            try:
                with trio.fail_after(self.timings.handshake_timeout + 1):
                    channel = await handshake(
                        stream,
                        outbound=outbound,
                        intro=wire.encode_intro(intro),
                        mesh_key=self.mesh_key,
                        max_message=wire.MAX_MESSAGE,
                        timeout=self.timings.handshake_timeout,
                    )
            except HandshakeError as exc:
                reason = str(getattr(exc, "reason", "") or exc)
                failure = _failure_for(reason)
                log.warning("%s handshake failed: %s", label, reason)
                return
            except trio.TooSlowError:
                reason = "handshake timed out"
                log.warning("%s handshake failed: %s", label, reason)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                reason = f"connection lost during handshake: {exc}"
                log.warning("%s handshake failed: %s", label, reason)
                return
            finally:
                if not outbound:
                    self._pending_handshakes -= 1
            try:
                remote = wire.decode_intro(channel.remote_intro)
            except wire.ProtocolError as exc:
                reason = f"invalid intro: {exc}"
                log.warning("%s %s", label, reason)
                return
            label = f"{arrow}[{address}|{remote.name}({remote.nickname})]"
            if remote.name == self.name:
                failure = Failure.NEVER
                if remote.uid == self.uid:
                    reason = "cannot connect to ourself"
                    log.info("%s %s: not retrying this address", label, reason)
                else:
                    reason = f"peer name collision: {remote.name} is also the name of another peer"
                    log.error("%s %s; give one of them another --name", label, reason)
                return
            candidate = Connection(
                channel=channel,
                local_name=self.name,
                intro=remote,
                our_conn_id=our_conn_id,
                outbound=outbound,
                remote_address=address,
                target=target,
                we_trust_them=trusted,
                sender=self._hub.new_sender(remote.name),
                timings=ConnectionTimings(self.timings.heartbeat, self.timings.read_timeout),
            )
            rejected = self._add_connection(candidate)
            if rejected is not None:
                reason, failure = rejected.reason, rejected.failure
                log.info("%s connection refused: %s", label, reason)
                return
            conn = candidate
            reason = await conn.run(self._on_message)
            failure = _failure_for(reason)
        finally:
            stopping = trio.current_effective_deadline() == -math.inf  # we are being cancelled
            with trio.CancelScope(shield=True), trio.move_on_after(self.timings.close_timeout):
                if channel is not None:
                    await channel.aclose()
                else:
                    await stream.aclose()
            if conn is not None:
                self._remove_connection(conn, reason, failure, stopping=stopping)
            elif outbound and target is not None:
                self._maker.attempt_failed(target, reason, failure, trio.current_time())
                self._wake_maker()

    # ---------------------------------------------------------------------------------------------
    # Connections

    def _add_connection(self, conn: Connection) -> _Rejected | None:
        """Admit an introduced connection (tie-break with a duplicate, conn-limit) and announce it."""
        peer = conn.remote_name
        existing = self._connections.get(peer)
        if existing is not None:
            verdict = tie_break(conn.uid, existing.uid)
            duplicate = f"multiple connections to {peer}({conn.remote_nickname}): keeping the other one"
            if verdict == "existing":
                return _Rejected(duplicate)
            existing.shutdown(duplicate)
            self._detach(existing)
            if verdict == "both-die":
                self._update_local_topology()
                return _Rejected(duplicate)
        elif len(self._connections) >= self.conn_limit:
            return _Rejected(f"connection limit ({self.conn_limit}) reached")
        self._connections[peer] = conn
        self.topology.note_peer(peer, conn.remote_nickname, conn.remote_uid)
        conn.established = self.auto_establish
        self._hub.attach(conn.sender)
        self._update_local_topology()
        if conn.target is not None:
            self._maker.connected(conn.target)
        self._hub.send_all_down(peer)
        self._wake_maker()
        log.info("%s connection added (%s)", conn, "encrypted" if conn.encrypted else "unencrypted")
        for callback in list(self._listeners.connections):
            _notify(lambda c, callback=callback: callback(c, True), conn)
        return None

    def _detach(self, conn: Connection) -> None:
        if self._connections.get(conn.remote_name) is conn:
            del self._connections[conn.remote_name]
            for callback in list(self._listeners.connections):
                _notify(lambda c, callback=callback: callback(c, False), conn)
        self._hub.detach(conn.sender)

    def _remove_connection(self, conn: Connection, reason: str, failure: Failure, *, stopping: bool = False) -> None:
        was_current = self._connections.get(conn.remote_name) is conn
        self._detach(conn)
        if stopping:
            log.info("%s connection closed: %s", conn, reason)
            return
        log.info("%s connection deleted: %s", conn, reason)
        if was_current:
            self._update_local_topology()
            self._gc()
        self._maker.terminated(conn.target, reason, failure, trio.current_time())
        self._wake_maker()

    def _update_local_topology(self) -> None:
        summaries = [
            wire.ConnectionSummary(c.remote_name, c.remote_address, c.outbound, c.established)
            for c in self._connections.values()
        ]
        if self.topology.set_local_connections(summaries):
            self._announce_names({self.name})
            self._topology_changed()

    def _trusts(self, address: str) -> bool:
        if not self.trusted_subnets:
            return False
        try:
            ip = ipaddress.ip_address(split_address(address)[0])
        except ValueError:
            return False
        return any(ip in subnet for subnet in self.trusted_subnets)

    def _live_connections(self) -> list[LiveConnection]:
        return [
            LiveConnection(c.remote_name, c.remote_address, c.outbound, c.target) for c in self._connections.values()
        ]

    def connection_to(self, peer: PeerName) -> Connection | None:
        return self._connections.get(peer)

    def set_connection_established(self, peer: PeerName, established: bool = True) -> None:
        """For the datapath: the link to `peer` carries data (or stopped); advertised in topology."""
        conn = self._connections.get(peer)
        if conn is not None and conn.established != established:
            conn.established = established
            self._update_local_topology()

    def set_connection_attrs(self, peer: PeerName, attrs: dict[str, Any]) -> None:
        """For the datapath: what status shows about the link (e.g. name, mtu)."""
        conn = self._connections.get(peer)
        if conn is not None:
            conn.attrs = dict(attrs)

    def set_overlay_handler(self, handler: Callable[[Connection, int, bytes], None] | None) -> None:
        """For the datapath: receive overlay-control messages (subtag, payload) from neighbours."""
        self._listeners.overlay_control = handler

    # ---------------------------------------------------------------------------------------------
    # Messages and topology

    def _on_message(self, conn: Connection, message: wire.Message, raw: bytes) -> None:
        match message:
            case wire.Heartbeat():
                pass
            case wire.Gossip() | wire.GossipUnicast() | wire.GossipBroadcast():
                self._hub.deliver(conn.remote_name, message, raw)
            case wire.OverlayControl(subtag, payload):
                handler = self._listeners.overlay_control
                if handler is None:
                    log.debug("%s overlay control message (subtag %d) with no datapath: ignored", conn, subtag)
                else:
                    handler(conn, subtag, payload)

    def _on_topology_merge(self, result: MergeResult) -> None:
        if self.name in result.changed:
            log.info("saw a newer record of ourselves from an earlier run: re-announcing %s", self.name)
            self._announce_names({self.name})
        for name in sorted(result.new_peers):
            record = self.topology.get(name)
            log.debug("learned peer %s(%s)", name, record.nickname if record else "")
        if result.changed:
            self._gc_pending = True
            self._announce_wake.set()
            self._topology_changed()

    def _announce_names(self, names: set[PeerName]) -> None:
        self._announce |= names
        self._announce_wake.set()

    def _topology_changed(self) -> None:
        self._routes_dirty = True
        self._routes_notified = False
        self._routes_wake.set()
        self._wake_maker()

    def _gc(self) -> None:
        removed = self.topology.gc(set(self._connections))
        if not removed:
            return
        self._topology_changed()
        for record in removed:
            log.info("removed unreachable peer %s(%s)", record.name, record.nickname)
            for callback in list(self._listeners.peer_gone):
                _notify(callback, record.name)

    async def _announce_loop(self) -> None:
        while True:
            await self._announce_wake.wait()
            await trio.sleep(self.timings.topology_batch)
            self._announce_wake = trio.Event()
            if self._gc_pending:
                self._gc_pending = False
                self._gc()
            names, self._announce = self._announce, set()
            if names:
                self._topology_channel.gossip_neighbourhood(TopologyGossipData(self.topology, names))

    async def _anti_entropy_loop(self) -> None:
        while True:
            await trio.sleep(self.timings.gossip_interval)
            self._hub.gossip_all()

    # ---------------------------------------------------------------------------------------------
    # Routes

    @property
    def routes(self) -> Routes:
        """The current route tables (recomputed on demand after a topology change)."""
        if self._routes_dirty:
            self._routes = compute_routes(self.name, self.topology.peers)
            self._routes_dirty = False
        return self._routes

    def subscribe_routes(self, callback: Callable[[Routes], None]) -> None:
        """Call `callback(routes)` after topology changes (debounced), e.g. to push routes to the datapath."""
        self._listeners.routes.append(callback)

    def subscribe_connections(self, callback: Callable[[Connection, bool], None]) -> None:
        """Call `callback(connection, True)` when a connection is admitted and `(connection, False)`
        when it goes, e.g. to give the datapath the peer's address and keys."""
        self._listeners.connections.append(callback)

    def subscribe_peer_gone(self, callback: Callable[[PeerName], None]) -> None:
        """Call `callback(name)` when a peer is garbage-collected (unreachable), e.g. for IPAM."""
        self._listeners.peer_gone.append(callback)

    async def _routes_loop(self) -> None:
        while True:
            await self._routes_wake.wait()
            await trio.sleep(self.timings.route_debounce)
            self._routes_wake = trio.Event()
            if self._routes_notified:
                continue
            self._routes_notified = True
            routes = self.routes
            for callback in list(self._listeners.routes):
                _notify(callback, routes)
            event, self.routes_changed = self.routes_changed, trio.Event()
            event.set()

    # ---------------------------------------------------------------------------------------------
    # Connection maker

    def _wake_maker(self) -> None:
        self._maker_wake.set()

    async def _maker_loop(self) -> None:
        while True:
            self._maker_wake = trio.Event()
            attempting = sum(1 for t in self._maker.targets.values() if t.state is TargetState.ATTEMPTING)
            room = max(0, self.conn_limit - len(self._connections) - attempting)
            due = self._maker.refresh(
                self._live_connections(), list(self.topology.peers.values()), self.name, trio.current_time(), room
            )
            assert self._nursery is not None
            for address in due:
                self._nursery.start_soon(self._dial, address)
            wake = self._maker.next_wakeup()
            with trio.move_on_at(wake if wake is not None else math.inf):
                await self._maker_wake.wait()

    # ---------------------------------------------------------------------------------------------
    # The API's calls

    async def connect(self, peers: Sequence[str], *, replace: bool = False) -> list[str]:
        """Add (or with `replace`, set) the direct targets. Returns errors for unparsable peers (none applied)."""
        errors = self._maker.connect(list(peers), replace=replace, now=trio.current_time())
        if errors:
            return errors
        self._persist_targets()
        self._wake_maker()
        return []

    def forget(self, peers: Sequence[str]) -> None:
        """Stop dialling these direct targets (existing connections stay up, as in Weave Net)."""
        self._maker.forget(list(peers))
        self._persist_targets()
        self._wake_maker()

    def _persist_targets(self) -> None:
        self.store.put_json(TARGETS_KEY, self._maker.direct_targets())

    def new_gossip_channel(self, name: str, gossiper: Gossiper) -> GossipChannel:
        """Register a gossip channel (IPAM, DNS); see `gossip.Gossiper` for the callbacks."""
        return self._hub.register(name, gossiper)

    # ---------------------------------------------------------------------------------------------
    # Status

    def report(self) -> dict[str, Any]:
        """The /report "Router" section (Weave Net's shape), JSON-ready."""
        routes = self.routes
        peers = []
        for name in sorted(self.topology.peers):
            record = self.topology.peers[name]
            peers.append(
                {
                    "Name": str(record.name),
                    "NickName": record.nickname,
                    "UID": record.uid,
                    "Version": record.version,
                    "Connections": [
                        {
                            "Name": str(c.peer),
                            "NickName": self._nickname_of(c.peer),
                            "Address": c.address,
                            "Outbound": c.outbound,
                            "Established": c.established,
                        }
                        for c in record.connections
                    ],
                }
            )
        return {
            "Protocol": PROTOCOL,
            "ProtocolMinVersion": MIN_VERSION,
            "ProtocolMaxVersion": MAX_VERSION,
            "Encryption": self.mesh_key is not None,
            "PeerDiscovery": self.discovery,
            "Name": str(self.name),
            "NickName": self.nickname,
            "Port": self.port,
            "Peers": peers,
            "UnicastRoutes": [{"Dest": str(self.name), "Via": UNKNOWN_PEER}]
            + [{"Dest": str(dst), "Via": str(hop)} for dst, hop in sorted(routes.unicast.items())],
            "BroadcastRoutes": [
                {"Source": str(source), "Via": [str(h) for h in routes.broadcast(source)]}
                for source in sorted(self.topology.peers)
                if source == self.name or source in routes.unicast
            ],
            "Connections": self._connection_status() + self._maker.status(trio.current_time()),
            "TerminationCount": self._maker.termination_count,
            "Targets": self._maker.direct_targets(),
            "TrustedSubnets": [str(s) for s in self.trusted_subnets],
            "ConnLimit": self.conn_limit,
        }

    def _nickname_of(self, name: PeerName) -> str:
        record = self.topology.get(name)
        return record.nickname if record is not None else ""

    def _connection_status(self) -> list[dict[str, Any]]:
        out = []
        for peer in sorted(self._connections):
            conn = self._connections[peer]
            attrs: dict[str, Any] = dict(conn.attrs)
            info = f"{peer}({conn.remote_nickname})"
            if "name" in attrs:
                info = f"{attrs['name']!s:<6} {info}"
            if self.mesh_key is not None:
                if conn.untrusted:
                    info = f"{'encrypted':<11} {info}"
                    attrs["encrypted"] = True
                else:
                    info = f"{'unencrypted':<11} {info}"
            out.append(
                {
                    "Address": conn.remote_address,
                    "Outbound": conn.outbound,
                    "State": "established" if conn.established else "pending",
                    "Info": info,
                    "Attrs": attrs or None,
                }
            )
        return out

    def connected_peers(self) -> list[PeerName]:
        return sorted(self._connections)

    def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Prometheus samples (name, help, labels, value), Weave Net's names where they exist."""
        counts: dict[tuple[str, str, str], int] = {}
        for entry in self._connection_status() + self._maker.status(trio.current_time()):
            attrs = entry["Attrs"] or {}
            key = (str(entry["State"]), str(attrs.get("name", "")), "yes" if attrs.get("encrypted") else "")
            counts[key] = counts.get(key, 0) + 1
        for state in ALL_CONNECTION_STATES:
            if not any(k[0] == state for k in counts):
                counts[(state, "", "")] = 0
        samples: list[tuple[str, str, dict[str, str], float]] = [
            (
                "weave_connections",
                "Number of peer-to-peer connections.",
                {"state": state, "type": kind, "encryption": enc},
                float(n),
            )
            for (state, kind, enc), n in sorted(counts.items())
        ]
        samples.append(
            (
                "weave_connection_terminations_total",
                "Number of peer-to-peer connections terminated.",
                {},
                float(self._maker.termination_count),
            )
        )
        samples.append(("weave_peers", "Number of peers known in the mesh.", {}, float(len(self.topology.peers))))
        stats = self._hub.stats
        for direction, messages, size in (
            ("in", stats.messages_in, stats.bytes_in),
            ("out", stats.messages_out, stats.bytes_out),
        ):
            for kind in ("gossip", "unicast", "broadcast"):
                labels = {"direction": direction, "kind": kind}
                samples.append(("weave_gossip_messages_total", _HELP_MESSAGES, labels, messages.get(kind, 0)))
                samples.append(("weave_gossip_bytes_total", _HELP_BYTES, labels, size.get(kind, 0)))
        samples.append(("weave_gossip_dropped_total", _HELP_DROPPED, {}, stats.dropped))
        return samples

    def known_peers(self) -> list[PeerName]:
        """Peers we hold a real record for (placeholders excluded), ourselves included."""
        return sorted(n for n, r in self.topology.peers.items() if not is_placeholder(r))
