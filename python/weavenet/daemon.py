"""The router daemon: wires every part into one trio nursery per router.

Shape of the tree (read top to bottom in `run_daemon`):
    run_daemon
    ├── signal watcher          SIGTERM/SIGINT → cancel everything, close connections cleanly
    ├── datapath                the Rust datapath's TAP and UDP 6783 (net/overlay.py), then the kernel
    │                           fast path's VXLAN port, UDP 6784 (net/kernel_path.py): before the router
    ├── mesh router             TCP 6783: connections, gossip, routes, connection maker
    ├── IPAM allocator          ring gossip, consensus, retries (ipam/allocator.py)
    ├── HTTP API                127.0.0.1:6784: status, report, connect/forget, metrics, stop
    └── Docker plugin           /run/docker/plugins/{weavemesh,weave}.sock; the `weave` network
                                (in the managed V2 plugin: its one socket + swarm peers, plugin/v2/)
It must never block the trio loop: slow work (key derivation) runs in a thread.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

import trio

from weavenet import __version__
from weavenet._fastdp import MeshKey
from weavenet.api.routes import build_api
from weavenet.api.server import serve_tcp, serve_unix
from weavenet.config import Settings
from weavenet.ipam.allocator import Allocator
from weavenet.ipam.hostcheck import bridge_addresses, check_range_is_free
from weavenet.mesh.peer_name import PeerName
from weavenet.mesh.router import Router
from weavenet.net import vxlan
from weavenet.net.containers import Containers
from weavenet.net.kernel_path import FASTDP, SLEEVE, KernelPath
from weavenet.net.mtu import MIN_MTU, overlay_mtu, underlay_mtu
from weavenet.net.overlay import TAP_NAME, Overlay
from weavenet.plugin.server import PluginService, plugin_dir
from weavenet.store import Store

log = logging.getLogger("weavenet")

PID_FILE = "weavenet.pid"
LOG_FILE = "weavenet.log"


@dataclass
class Node:
    """One running router instance, as the API handlers see it."""

    settings: Settings
    store: Store
    name: PeerName
    router: Router
    ipam: Allocator | None = None  # None when IPAM is disabled (empty --ipalloc-range)
    containers: Containers | None = None  # attach/detach/expose/ps on this host
    overlay: Overlay | None = None  # the datapath's controller (None with --no-datapath)
    kernel: KernelPath | None = None  # the kernel fast path's (None with --no-datapath; off with --no-fastdp)
    plugin: PluginService | None = None  # the Docker plugin, when it serves (see plugin.server.plugin_dir)
    started_at: float = field(default_factory=time.time)
    stop_requested: trio.Event = field(default_factory=trio.Event)

    @property
    def version(self) -> str:
        return __version__


def resolve_peer_name(settings: Settings, store: Store) -> PeerName:
    """The peer name: from --name, else the persisted one, else a fresh random one (persisted)."""
    if settings.name is not None:
        store.put_json("peer_name", str(settings.name))
        return settings.name
    saved = store.get_json("peer_name")
    if isinstance(saved, str):
        try:
            return PeerName.parse(saved)
        except ValueError:
            log.warning("persisted peer name %r is invalid; generating a new one", saved)
    name = PeerName.random()
    store.put_json("peer_name", str(name))
    return name


def _in_use(containers: Containers) -> Callable[[], list[tuple[str, IPv4Interface]]]:
    """What IPAM must claim back at start: addresses on the bridge (expose) and in the namespaces
    we attached that still exist, so a router that lost its state never hands them out again."""

    def scan() -> list[tuple[str, IPv4Interface]]:
        attached = [(ident, cidr) for ident, cidrs in containers.live_addresses().items() for cidr in cidrs]
        return bridge_addresses() + attached

    return scan


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # pyroute2 logs every netlink message at debug, and opens an asyncio loop (logged) per IPRoute: never below info
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(getattr(logging, level.upper()), logging.INFO))


def write_pid_file(state_dir: Path) -> Path:
    """Write our pid atomically (write a temporary file, then rename over the old one)."""
    path = state_dir / PID_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
    return path


def read_pid_file(state_dir: Path) -> int | None:
    """The pid of a live daemon recorded in `state_dir`, or None."""
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


async def _watch_signals(cancel_scope: trio.CancelScope, node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def _watch_stop_request(cancel_scope: trio.CancelScope, node: Node) -> None:
    await node.stop_requested.wait()
    log.info("stop requested through the API: shutting down")
    cancel_scope.cancel()


def _connect_peer(router: Router) -> Callable[[str], Awaitable[None]]:
    """For the global driver: a node Docker discovered (cluster store) becomes a connection target."""

    async def connect(address: str) -> None:
        errors = await router.connect([address])
        if errors:
            log.warning("not connecting to discovered node %s: %s", address, "; ".join(errors))

    return connect


PluginFactory = Callable[[Node], PluginService]


async def run_daemon(settings: Settings, *, plugin_factory: PluginFactory | None = None) -> None:
    """Run one router until SIGTERM/SIGINT or `weavenet stop`.

    `plugin_factory` replaces the legacy plugin (the managed V2 plugin brings its own service).
    """
    if settings.ipalloc_range is not None:
        check_range_is_free(settings.ipalloc_range)  # ConfigError naming the flag and the route
    store = Store(settings.state_dir)
    name = resolve_peer_name(settings, store)
    mesh_key = None
    if settings.password:
        # Argon2id is deliberately slow and memory-hard: keep it off the event loop.
        mesh_key = await trio.to_thread.run_sync(MeshKey.from_password, settings.password.encode())
    router = Router(
        name=name,
        nickname=settings.nickname,
        listen_host=settings.host,
        port=settings.port,
        mesh_key=mesh_key,
        store=store,
        conn_limit=settings.conn_limit,
        discovery=settings.discovery,
        trusted_subnets=settings.trusted_subnets,
        # With a datapath, a link counts as established only once its UDP heartbeats arrive.
        auto_establish=not settings.datapath,
        data_port=settings.port if settings.datapath else 0,
        overlays=((FASTDP, SLEEVE) if settings.fastdp else (SLEEVE,)) if settings.datapath else (),
    )
    underlay = underlay_mtu()  # before our own links exist (the TAP's 65000 would count otherwise)
    mtu = overlay_mtu(settings.mtu, encrypted=mesh_key is not None, underlay=underlay)
    containers = Containers(store=store, ipam=None, mtu=mtu)
    node = Node(settings=settings, store=store, name=name, router=router, containers=containers)
    if settings.ipalloc_range is not None:
        # Before the router serves: the allocator registers its gossip channel.
        node.ipam = Allocator.from_settings(router, store, settings, pre_claims=_in_use(containers))
    pid_path = write_pid_file(settings.state_dir)
    log.info(
        "weavenet %s starting: peer %s(%s), mesh port %d, encryption %s, state in %s",
        __version__,
        name,
        settings.nickname,
        settings.port,
        "enabled" if mesh_key else "disabled",
        settings.state_dir,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, node)
            nursery.start_soon(_watch_stop_request, nursery.cancel_scope, node)
            if settings.datapath:
                # Before the router serves, so that every connection reaches the datapath.
                node.overlay = Overlay(router, port=settings.port, mtu=mtu, bind_host=settings.host)
                await nursery.start(node.overlay.run)
                node.kernel = KernelPath(
                    router,
                    port=settings.kernel_port,
                    mtu=mtu,
                    device_mtu=max(MIN_MTU, underlay - vxlan.OVERHEAD),
                    # With a password, only peers in trusted subnets may go plain.
                    enabled=settings.fastdp and (mesh_key is None or bool(settings.trusted_subnets)),
                    disabled_reason="disabled by --no-fastdp" if not settings.fastdp else "encrypted",
                    local_host=settings.host,
                    tap=TAP_NAME,
                )
                await nursery.start(node.kernel.run)
            await nursery.start(router.serve)
            if node.ipam is not None:
                await nursery.start(node.ipam.run)
            if settings.peers:
                await router.connect([str(p) for p in settings.peers])
            containers.ipam = node.ipam  # attach/expose allocate through IPAM from now on
            if settings.http_addr is not None:
                api = build_api(node)
                if settings.http_addr.unix_path:
                    await nursery.start(serve_unix, api, Path(settings.http_addr.unix_path))
                else:
                    await nursery.start(serve_tcp, api, settings.http_addr.host, settings.http_addr.port)
                log.info("HTTP API on %s", settings.http_addr)
            if plugin_factory is not None:
                node.plugin = plugin_factory(node)
                await nursery.start(node.plugin.run)
            elif (directory := plugin_dir(settings)) is not None:
                node.plugin = PluginService(
                    settings, directory, store=store, allocator=lambda: node.ipam, on_peer=_connect_peer(router)
                )
                await nursery.start(node.plugin.run)
    finally:
        pid_path.unlink(missing_ok=True)
        store.close()
        log.info("weavenet stopped")
