"""The router's side of the Rust datapath: it decides, the datapath moves the bytes.

It opens the datapath (a TAP on the `weave` bridge and the UDP data port), then keeps it in step
with the mesh: every admitted connection becomes a datapath peer (underlay address, data port,
the connection's data keys unless both ends trust each other), every route change is pushed as
unicast next hops and broadcast trees, and what the datapath sees comes back: a peer whose UDP
heartbeats arrive marks that link established (so routes use it), path-MTU changes show in status.
No packet passes through here; nothing here runs on a datapath thread.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from pyroute2 import IPRoute

from weavenet._fastdp import Datapath
from weavenet.net import bridge, firewall, sysctl, vxlan

if TYPE_CHECKING:
    from weavenet.mesh.connection import Connection
    from weavenet.mesh.peer_name import PeerName
    from weavenet.mesh.router import Router
    from weavenet.mesh.routes import Routes

log = logging.getLogger(__name__)

TAP_NAME = "weave-dp"
TAP_MTU = 65000  # the TAP takes any frame: oversize packets must reach the datapath to be answered


def split_host(address: str) -> str:
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


class Overlay:
    """One datapath, kept in step with one router."""

    def __init__(self, router: Router, *, port: int, mtu: int, bind_host: str = "") -> None:
        self.router = router
        self.port = port
        self.mtu = mtu
        self.bind_host = bind_host or "0.0.0.0"
        self.datapath: Datapath | None = None

    # --- plumbing ---

    def _open(self) -> Datapath:
        """Blocking: the bridge, the datapath with its TAP, the TAP on the bridge, forwarding allowed."""
        bridge.ensure_bridge(mtu=self.mtu)
        firewall.allow_bridge_forwarding(bridge.BRIDGE_NAME)
        with IPRoute() as ipr:
            stale = bridge.link_index(ipr, TAP_NAME)
            if stale is not None:  # a TAP left by a router that was killed
                ipr.link("del", index=stale)
        datapath = Datapath.open(TAP_NAME, self.port, self.mtu, int(self.router.name), self.bind_host)
        try:
            sysctl.quiet_ipv6(TAP_NAME)
            with IPRoute() as ipr:
                index = bridge.link_index(ipr, TAP_NAME)
                master = bridge.link_index(ipr, bridge.BRIDGE_NAME)
                ipr.link("set", index=index, master=master, mtu=TAP_MTU, state="up")
            vxlan.isolate_port(TAP_NAME)  # never a frame between the TAP and the kernel path's port
        except BaseException:
            datapath.close()
            raise
        return datapath

    # --- mesh → datapath ---

    def _on_connection(self, conn: Connection, up: bool) -> None:
        datapath = self.datapath
        if datapath is None:
            return
        peer = int(conn.remote_name)
        if not up:
            datapath.remove_peer(peer)
            return
        if conn.intro.data_port == 0:
            log.info("%s runs no datapath: control only", conn)
            return
        keys = conn.channel.data_keys if conn.untrusted else None
        datapath.set_peer(peer, split_host(conn.remote_address), conn.intro.data_port, keys)
        # The path's name (fastdp or sleeve) is the kernel path's to say (net/kernel_path.py).
        self.router.set_connection_attrs(
            conn.remote_name, {**conn.attrs, "encrypted": keys is not None, "mtu": self.mtu}
        )

    def _on_routes(self, routes: Routes) -> None:
        datapath = self.datapath
        if datapath is None:
            return
        unicast = {int(dest): int(hop) for dest, hop in routes.unicast.items()}
        sources = set(routes.unicast) | set(routes.unicast_all)
        broadcast_via = {int(source): [int(h) for h in routes.broadcast(source)] for source in sources}
        datapath.set_routes(unicast, [int(h) for h in routes.broadcast(routes.local)], broadcast_via)

    # --- datapath → mesh ---

    def _on_event(self, event: tuple[Any, ...]) -> str | None:
        """Reflect one datapath event in the mesh; returns a reason if the datapath failed."""
        kind = event[0]
        if kind == "datapath_failed":
            return str(event[1])
        peer = self._peer(event[1]) if isinstance(event[1], int) else None
        conn = self.router.connection_to(peer) if peer is not None else None
        if peer is None or conn is None:
            return None
        if kind in ("peer_up", "peer_down"):
            log.info("datapath link to %s %s", peer, "up" if kind == "peer_up" else "down")
            self.router.set_connection_established(peer, kind == "peer_up")
        elif kind == "pmtu":
            self.router.set_connection_attrs(peer, {**conn.attrs, "mtu": int(event[2])})
        elif kind == "peer_endpoint":
            # An encrypted peer's authenticated datagrams now come from elsewhere (NAT rebinding).
            log.info("datapath: %s now sends from %s", peer, event[2])
            self.router.set_connection_attrs(peer, {**conn.attrs, "endpoint": str(event[2])})
        return None

    def _peer(self, peer_id: int) -> PeerName | None:
        for name in self.router.connected_peers():
            if int(name) == peer_id:
                return name
        return None

    # --- the task ---

    def _resync(self) -> None:
        """Push every current connection and the routes into a freshly opened datapath."""
        for peer in self.router.connected_peers():
            conn = self.router.connection_to(peer)
            if conn is not None:
                self._on_connection(conn, True)
        self._on_routes(self.router.routes)

    async def _serve_events(self, datapath: Datapath) -> str:
        """Relay events until the datapath reports that it failed; returns why."""
        fd = datapath.events_fd()
        while True:
            await trio.lowlevel.wait_readable(fd)
            for event in datapath.drain_events():
                failure = self._on_event(event)
                if failure is not None:
                    return failure

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.router.subscribe_connections(self._on_connection)
        self.router.subscribe_routes(self._on_routes)
        started = False
        while True:
            datapath = await trio.to_thread.run_sync(self._open)
            self.datapath = datapath
            log.info(
                "datapath on %s (UDP %d, overlay MTU %d, %s, TAP offloads %#x, UDP GRO %s)",
                TAP_NAME,
                datapath.udp_port,
                self.mtu,
                datapath.cipher,
                datapath.tap_offloads,
                "on" if datapath.udp_gro else "off",
            )
            try:
                self._resync()
                if not started:
                    task_status.started()
                    started = True
                reason = await self._serve_events(datapath)
                log.error("datapath failed (%s): reopening it", reason)
            finally:
                self.datapath = None
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(datapath.close)
            await trio.sleep(1.0)  # a failure that repeats must not spin

    def stats(self) -> dict[str, Any]:
        return self.datapath.stats() if self.datapath is not None else {}
