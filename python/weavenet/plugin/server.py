"""The Docker plugin inside the router: its unix sockets, activation, and the `weave` network.

Sockets (legacy v1 discovery: the driver name is the socket's basename):
    <plugin-dir>/weavemesh.sock   NetworkDriver + IpamDriver, scope local (weavenet IPAM)
    <plugin-dir>/weave.sock       NetworkDriver, scope global (Docker's IPAM; needs a cluster store)
Every call is `POST /<Interface>.<Method>` with a JSON body. Replies: 200 with a JSON object;
400 with a plain-text line for a body that does not decode; 500 `{"Err": "..."}` for a call that
cannot be done; 404 for a method we do not know. Calls run concurrently and answer in milliseconds.
A socket another live process is serving is never taken over; a stale one is replaced, and ours are
removed on exit. Docker caches activation for its lifetime, so after a restart we must answer at
once, from what the store and the kernel still hold, without any Activate or CreateNetwork. Once
Docker answers after a start, running containers' addresses are reclaimed and those of containers
that ended while we were down are freed (plugin.prune); while we run, a container Docker destroys
gives back what IPAM holds under its id (plugin.watcher).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from weavenet.api.server import Request, Response, Router, serve_unix
from weavenet.ipam.errors import IpamError
from weavenet.net import bridge, firewall
from weavenet.net.mtu import overlay_mtu
from weavenet.plugin import docker_network, endpoints, prune
from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.ipam_driver import ANONYMOUS, Allocator, IpamDriver
from weavenet.plugin.network_driver import NetworkDriver, PeerCallback
from weavenet.plugin.options import BadRequest, DriverError, body_object
from weavenet.plugin.state import AddressBook, NetworkTable
from weavenet.plugin.watcher import ContainerWatcher

if TYPE_CHECKING:
    from weavenet.config import Settings
    from weavenet.store import Store

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
DEFAULT_PLUGIN_DIR = Path("/run/docker/plugins")
RETRY_MAX = 60.0  # seconds between attempts to create the `weave` network
NAMES_REFRESH = 30.0  # seconds between refreshes of network names (for status)
STOP_TIMEOUT = 5.0  # at most this long removing the unused `weave` network on shutdown


class PluginError(Exception):
    """The plugin cannot start (a socket is taken, a path is not usable); one line."""


def plugin_dir(settings: Settings) -> Path | None:
    """Where to put the sockets, or None when the plugin should stay off.

    On by default when /run/docker/plugins exists and this router shares the network namespace of
    PID 1 (where dockerd runs): a router in a lab namespace must not take the host's sockets.
    """
    if not settings.plugin or not (settings.plugin_mesh_name or settings.plugin_name):
        return None
    if settings.plugin_dir is not None:
        return settings.plugin_dir
    if not DEFAULT_PLUGIN_DIR.is_dir():
        return None
    try:
        if os.stat("/proc/self/ns/net").st_ino != os.stat("/proc/1/ns/net").st_ino:
            return None
    except OSError:
        return None
    return DEFAULT_PLUGIN_DIR


@dataclass
class CallStats:
    count: int = 0
    errors: int = 0
    total: float = 0.0
    slowest: float = 0.0

    def add(self, seconds: float, *, failed: bool) -> None:
        self.count += 1
        self.errors += int(failed)
        self.total += seconds
        self.slowest = max(self.slowest, seconds)

    def to_json(self) -> dict[str, Any]:
        mean = self.total / self.count if self.count else 0.0
        return {
            "Count": self.count,
            "Errors": self.errors,
            "MeanMs": round(mean * 1000, 3),
            "MaxMs": round(self.slowest * 1000, 3),
        }


@dataclass
class PluginSocket:
    path: Path
    driver: str
    scope: str
    implements: list[str]
    router: Router


@dataclass
class WeaveNetworkState:
    name: str
    subnet: str = ""
    state: str = "pending"  # pending | created | exists | failed | disabled
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "Subnet": self.subnet, "State": self.state, "Error": self.error}


class PluginService:
    """The plugin: sockets, drivers and the `weave` network; one per router."""

    def __init__(
        self,
        settings: Settings,
        directory: Path,
        *,
        store: Store | None,
        allocator: Callable[[], Allocator | None],
        on_peer: PeerCallback | None = None,
        docker: DockerClient | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.allocator = allocator
        self.docker = docker or (DockerClient(settings.docker_api) if settings.docker_api else None)
        self.networks = NetworkTable(store)
        self.networks.load()
        self.book = AddressBook(store).load()
        self.prune_settle = prune.SETTLE
        self.pruned = {"Containers": 0, "Addresses": 0, "Endpoints": 0}
        self.watcher = ContainerWatcher(self.docker, allocator) if self.docker is not None else None
        self.calls: dict[str, CallStats] = {}
        self.names: dict[str, str] = {}  # network id → Docker name, refreshed from Docker
        self.names_stale = trio.Event()
        self.weave_network = WeaveNetworkState(settings.plugin_network)
        self.sockets: list[PluginSocket] = []
        self.drivers: list[NetworkDriver] = []
        if settings.plugin_mesh_name:
            mesh = NetworkDriver(
                settings.plugin_mesh_name,
                "local",
                self.networks,
                docker=self.docker,
                on_network=self._network_changed,
                book=self.book,
            )
            ipam = IpamDriver(allocator, self.book)
            self.drivers.append(mesh)
            self.sockets.append(self._socket(mesh, ipam))
        if settings.plugin_name:
            global_driver = NetworkDriver(
                settings.plugin_name,
                "global",
                self.networks,
                docker=self.docker,
                on_peer=on_peer,
                on_network=self._network_changed,
            )
            self.drivers.append(global_driver)
            self.sockets.append(self._socket(global_driver, None))

    # --- the sockets ---

    def _socket(self, driver: NetworkDriver, ipam: IpamDriver | None) -> PluginSocket:
        router = Router()
        implements = ["NetworkDriver"] + (["IpamDriver"] if ipam is not None else [])

        async def activate(body: dict[str, Any]) -> dict[str, Any]:
            return {"Implements": implements}

        router.add("POST", "/Plugin.Activate", self._endpoint("Plugin.Activate", activate))
        for method, handler in driver.handlers().items():
            router.add("POST", f"/NetworkDriver.{method}", self._endpoint(f"NetworkDriver.{method}", handler))
        if ipam is not None:
            for method, handler in ipam.handlers().items():
                router.add("POST", f"/IpamDriver.{method}", self._endpoint(f"IpamDriver.{method}", handler))

        async def not_found(request: Request) -> Response:
            log.debug("plugin: unknown call %s %s", request.method, request.path)
            return Response(404, b"404 page not found\n")

        router.not_found = not_found
        return PluginSocket(self.directory / f"{driver.name}.sock", driver.name, driver.scope, implements, router)

    def _endpoint(self, method: str, handler: Callable[[dict[str, Any]], Any]) -> Callable[[Request], Any]:
        stats = self.calls.setdefault(method, CallStats())

        async def handle(request: Request) -> Response:
            started = trio.current_time()
            failed = True
            try:
                try:
                    body = body_object(json.loads(request.body or b"null"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise BadRequest(f"Unable to decode JSON payload: {exc}") from None
                reply = await handler(body)
                failed = False
                return _reply(reply)
            except BadRequest as exc:
                log.warning("plugin: %s: bad request: %s", method, exc)
                return Response(400, (" ".join(str(exc).split()) + "\n").encode())
            except DriverError as exc:
                log.info("plugin: %s failed: %s", method, exc)
                return _reply({"Err": " ".join(str(exc).split())}, 500)  # always one line
            finally:
                elapsed = trio.current_time() - started
                stats.add(elapsed, failed=failed)
                log.debug("plugin: %s in %.1f ms%s", method, elapsed * 1000, " (failed)" if failed else "")

        return handle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the sockets; then create the `weave` network and reclaim running containers' addresses."""
        await trio.to_thread.run_sync(self._prepare_host)
        for sock in self.sockets:
            await _refuse_live_socket(sock.path)
        # The sockets serve in a shielded scope: on shutdown Docker must still reach us while we
        # remove the `weave` network (it calls back into our IPAM and driver to do so).
        serving = trio.CancelScope(shield=True)

        async def serve_sockets(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with serving:
                async with trio.open_nursery() as servers:
                    for sock in self.sockets:
                        await servers.start(serve_unix, sock.router, sock.path)
                        log.info(
                            "plugin: driver %s (%s, %s) on %s",
                            *(sock.driver, sock.scope, "+".join(sock.implements), sock.path),
                        )
                    task_status.started()

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_sockets)
            task_status.started()
            if self.docker is not None:
                nursery.start_soon(self._maintain_weave_network)
                nursery.start_soon(self._tidy_after_start, trio.current_time())
                if self.watcher is not None:
                    nursery.start_soon(self.watcher.run)
                nursery.start_soon(self._refresh_names)
            elif self.settings.plugin_network:
                self.weave_network.state, self.weave_network.error = "disabled", "no Docker API (--docker-api)"
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                    await self._remove_unused_weave_network()
                serving.cancel()

    async def _remove_unused_weave_network(self) -> None:
        """On a clean stop, remove the `weave` network if no container (running or stopped) uses it.

        Left behind, it would point Docker at a plugin that is gone: every call touching it would
        wait 15 s. One in use stays, so its containers keep their network across a restart.
        """
        state = self.weave_network
        if self.docker is None or state.state not in ("created", "exists"):
            return
        try:
            users = await self.docker.call(
                "GET", "/containers/json", query={"all": "1", "filters": json.dumps({"network": [state.name]})}
            )
            if users:
                log.info("plugin: keeping Docker network %s: %d container(s) use it", state.name, len(users))
                return
            await self.docker.remove_network(state.name)
            log.info("plugin: removed Docker network %s (unused)", state.name)
        except DockerError as exc:
            log.warning("plugin: leaving Docker network %s: %s", state.name, exc)

    def _prepare_host(self) -> None:
        """The weave bridge (if nobody made it yet) and the forwarding rule Docker's FORWARD DROP needs."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise PluginError(f"cannot use plugin directory {self.directory}: {exc.strerror}") from None
        if not endpoints.bridge_present():
            try:
                bridge.ensure_bridge(mtu=overlay_mtu(self.settings.mtu, encrypted=self.settings.encrypted))
            except bridge.PlumbingError as exc:
                raise PluginError(f"cannot create the {bridge.BRIDGE_NAME} bridge: {exc}") from None
        try:
            swept = endpoints.sweep_abandoned()
        except bridge.PlumbingError as exc:
            log.warning("plugin: cannot remove endpoints Docker abandoned: %s", exc)
            swept = []
        if swept:
            self.pruned["Endpoints"] += len(swept)
            dropped = "Docker dropped their DeleteEndpoint while no plugin answered"
            log.info("plugin: removed %s: %s", ", ".join(swept), dropped)
        try:
            firewall.allow_bridge_forwarding(bridge.BRIDGE_NAME)
        except firewall.FirewallError as exc:
            log.warning("plugin: containers on %s may not reach each other: %s", bridge.BRIDGE_NAME, exc)

    # --- the `weave` network ---

    def _default_subnet(self) -> IPv4Network | None:
        allocator = self.allocator()
        if allocator is not None:
            return allocator.default_subnet
        return self.settings.default_subnet

    async def _maintain_weave_network(self) -> None:
        """Create the `weave` network; retry (with backoff) while Docker or IPAM is not there yet."""
        state = self.weave_network
        if not state.name or not self.settings.plugin_mesh_name:
            state.state = "disabled"
            return
        if self.settings.default_subnet is None:
            state.state, state.error = "disabled", "IPAM is disabled (--ipalloc-range is empty)"
            log.info("plugin: not creating Docker network %s: %s", state.name, state.error)
            return
        assert self.docker is not None
        delay = 1.0
        while True:
            subnet = self._default_subnet()
            if subnet is not None and self.allocator() is not None:
                state.subnet = str(subnet)
                try:
                    state.state = await docker_network.ensure_network(
                        self.docker, state.name, self.settings.plugin_mesh_name, subnet
                    )
                    state.error = ""
                    log.info("plugin: Docker network %s (%s) %s", state.name, subnet, state.state)
                    self.names_stale.set()
                    return
                except (DockerError, docker_network.NetworkConflict) as exc:
                    if str(exc) != state.error:
                        log.error("plugin: cannot create Docker network %s: %s", state.name, exc)
                    state.state, state.error = "failed", str(exc)
                    if isinstance(exc, docker_network.NetworkConflict):
                        return
            else:
                state.error = "waiting for IPAM"
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    # --- after a restart: reclaim, names ---

    async def _tidy_after_start(self, serving_since: float) -> None:
        """Once IPAM and Docker are there: reclaim running containers' addresses, then free those
        of containers that ended while we were down (plugin.prune); nothing if Docker never answers."""
        assert self.docker is not None
        with trio.move_on_after(120):
            while self.allocator() is None:
                await trio.sleep(0.5)
        allocator = self.allocator()
        if allocator is None:
            return
        delay = 1.0
        while True:
            try:
                stock = await docker_network.inventory(self.docker)
                break
            except DockerError as exc:
                if exc.status != 0:
                    log.warning("plugin: cannot list Docker's containers; not reclaiming or pruning: %s", exc)
                    return
                if delay == 1.0:
                    log.info("plugin: Docker is not answering yet; will reclaim addresses when it does")
            await trio.sleep(delay)  # Docker not up yet (the router may start first at boot)
            delay = min(delay * 2, RETRY_MAX)
        if self.settings.plugin_mesh_name:
            await self._reclaim(allocator)
        self.pruned["Containers"] += len(await prune.prune_gone_containers(allocator, stock))
        if not self.settings.plugin_mesh_name:
            return
        await trio.sleep_until(serving_since + self.prune_settle)
        try:
            stock = await docker_network.inventory(self.docker)
        except DockerError as exc:
            log.warning("plugin: cannot list Docker's containers; not pruning IPAM addresses: %s", exc)
            return
        self.pruned["Addresses"] += len(await prune.prune_lost_releases(allocator, self.book, stock))

    async def _reclaim(self, allocator: Allocator) -> None:
        """Claim in IPAM the addresses of running containers on our networks that IPAM does not know.

        After a restart with the store intact this finds nothing to do; after a lost store it stops
        a new container from getting a running container's address.
        """
        assert self.docker is not None
        try:
            ours = await docker_network.our_networks(self.docker, [self.settings.plugin_mesh_name])
            found = await docker_network.endpoints_on(self.docker, {n.network_id for n in ours})
        except DockerError as exc:
            log.warning("plugin: cannot list containers to reclaim their addresses: %s", exc)
            return
        known = {c.ip for cidrs in allocator.owned().values() for c in cidrs}
        for endpoint in found:
            if endpoint.address is None:
                continue
            self.book.mention(str(endpoint.address.ip))  # in use: never a leftover
            if endpoint.address.ip in known or endpoint.address.ip not in allocator.range:
                continue
            try:
                # filed under its own text, as the IPAM driver files what Docker got from us
                await allocator.claim(ANONYMOUS, endpoint.address, no_error_on_unknown=True)
                self.book.add(str(endpoint.address.ip))
                log.info("plugin: reclaimed %s for container %s", endpoint.address, endpoint.container_id[:12])
            except IpamError as exc:
                log.warning("plugin: cannot reclaim %s for %s: %s", endpoint.address, endpoint.container_id[:12], exc)

    def _network_changed(self) -> None:
        self.names_stale.set()

    async def _refresh_names(self) -> None:
        assert self.docker is not None
        drivers = [d.name for d in self.drivers]
        while True:
            with trio.move_on_after(NAMES_REFRESH):
                await self.names_stale.wait()
                await trio.sleep(0.5)  # Docker stores the network after CreateNetwork returns
            self.names_stale = trio.Event()
            try:
                self.names = {n.network_id: n.name for n in await docker_network.our_networks(self.docker, drivers)}
            except DockerError as exc:
                log.debug("plugin: cannot refresh network names: %s", exc)

    # --- what the API shows ---

    def report(self) -> dict[str, Any]:
        return {
            "Sockets": [
                {"Path": str(s.path), "Driver": s.driver, "Scope": s.scope, "Implements": s.implements}
                for s in self.sockets
            ],
            "Network": self.weave_network.to_json(),
            "Networks": [
                {
                    "ID": r.network_id,
                    "Name": self.names.get(r.network_id, ""),
                    "Driver": r.driver,
                    "Multicast": r.multicast,
                    "Pools": list(r.pools),
                }
                for r in sorted(self.networks.networks.values(), key=lambda r: (r.driver, r.network_id))
            ],
            "Calls": {method: stats.to_json() for method, stats in sorted(self.calls.items()) if stats.count},
            "Pruned": {**self.pruned, "Destroyed": self.watcher.freed if self.watcher is not None else 0},
        }

    async def ps(self) -> list[dict[str, Any]]:
        """Containers on our networks: one row per endpoint (id, MAC, address), as `weavenet ps` lists them."""
        if self.docker is None:
            return []
        drivers = [d.name for d in self.drivers]
        try:
            ours = await docker_network.our_networks(self.docker, drivers)
            found = await docker_network.endpoints_on(self.docker, {n.network_id for n in ours})
        except DockerError as exc:
            log.warning("plugin: cannot list plugin containers: %s", exc)
            return []
        return [
            {"ID": e.container_id, "MAC": e.mac, "CIDRs": [str(e.address)] if e.address else []}
            for e in sorted(found, key=lambda e: (e.container_id, e.network_id))
        ]


def format_status(report: dict[str, Any]) -> str:
    """The plugin block of `weavenet status`."""

    def line(key: str, value: object) -> str:
        return f"{key:>15}: {value}\n"

    drivers = ", ".join(
        f"{s['Driver']} ({s['Scope']}, {'+'.join(i.replace('Driver', '').lower() for i in s['Implements'])})"
        for s in report["Sockets"]
    )
    network = report["Network"]
    if network["State"] in ("created", "exists"):
        weave = f"{network['Name']} ({network['Subnet']})"
    elif network["State"] == "disabled":
        weave = f"none{' (' + network['Error'] + ')' if network['Error'] else ''}"
    else:
        weave = f"{network['Name']} {network['State']}{': ' + network['Error'] if network['Error'] else ''}"
    names = [n["Name"] or n["ID"][:12] for n in report["Networks"]]
    text = line("Service", "plugin")
    text += line("Drivers", drivers or "none")
    text += line("Sockets", ", ".join(s["Path"] for s in report["Sockets"]) or "none")
    text += line("DefaultNetwork", weave)
    text += line("Networks", f"{len(names)}" + (f" ({', '.join(sorted(names))})" if names else ""))
    return text


def _reply(value: dict[str, Any], status: int = 200) -> Response:
    return Response(status, (json.dumps(value, separators=(",", ":")) + "\n").encode(), CONTENT_TYPE)


async def _refuse_live_socket(path: Path) -> None:
    """Refuse to take over a socket another process still serves (a second router, say)."""
    if not path.is_socket():
        return
    try:
        with trio.fail_after(1):
            stream = await trio.open_unix_socket(str(path))
    except (OSError, trio.TooSlowError):
        return  # stale: serve_unix replaces it
    await stream.aclose()
    raise PluginError(f"{path} is served by another process (another weavenet?); stop it or use --no-plugin")
