"""Peers from the swarm: learned from the Docker API on every start, then followed.

Weave Net's plugin asked Docker for the swarm managers only on its very first start and reused
the persisted peer list ever after, so a plugin that outlived its managers never found the new
ones. Here the router asks on every start and keeps asking: the managers' addresses
(`/info` → Swarm.RemoteManagers) on every node, and on a manager every ready node (`/nodes`).
Each becomes a connection target `IP:<our mesh port>`; an address that leaves the swarm is
forgotten again. Only targets this module added are ever forgotten (what users `connect`ed stays),
and the set is kept in the store so that a restart forgets the ones that left while it was down.
Docker may be unreachable (it starts plugins before its API at boot): then it retries quietly.
Never blocks the trio loop; every Docker call has the client's deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from weavenet.plugin.docker_api import DockerError

log = logging.getLogger(__name__)

STORE_KEY = "plugin.v2.swarm_peers"
SETTINGS_KEY = "plugin.v2.settings_peers"
REFRESH = 10.0  # seconds between looks at the swarm
RETRY_MAX = 30.0  # seconds between attempts while Docker does not answer


class DockerInfo(Protocol):
    async def info(self) -> dict[str, Any]: ...

    async def swarm_nodes(self) -> list[dict[str, Any]]: ...


class Targets(Protocol):
    """The router's side: add and remove connection targets."""

    async def connect(self, peers: Sequence[str], *, replace: bool = False) -> list[str]: ...

    def forget(self, peers: Sequence[str]) -> None: ...


class KeyValue(Protocol):
    def get_json(self, key: str, default: Any = None) -> Any: ...

    def put_json(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class SwarmView:
    """What Docker says about the swarm, reduced to what the mesh needs."""

    state: str  # LocalNodeState: inactive, pending, active, error, locked
    node_id: str
    addresses: frozenset[str]  # other nodes' IPs (managers; all ready nodes when we are a manager)


def host_of(address: str) -> str:
    """The IP of an address: 10.0.0.5:2377 → 10.0.0.5; [fd00::5]:2377 → fd00::5; a bare IP as it is."""
    address = address.strip()
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else ""
    if address.count(":") == 1:
        return address.split(":")[0]
    return address


def _usable(ip: str) -> bool:
    return bool(ip) and ip not in ("0.0.0.0", "::")


async def read_swarm(docker: DockerInfo) -> SwarmView:
    """One look at the swarm. Raises DockerError when Docker cannot be asked."""
    info = await docker.info()
    swarm = info.get("Swarm") or {}
    state = str(swarm.get("LocalNodeState") or "inactive")
    node_id = str(swarm.get("NodeID") or "")
    addresses: set[str] = set()
    if state == "active":
        for manager in swarm.get("RemoteManagers") or []:
            if manager.get("NodeID") != node_id:
                addresses.add(host_of(str(manager.get("Addr") or "")))
        if swarm.get("ControlAvailable"):
            for node in await docker.swarm_nodes():
                if node.get("ID") == node_id:
                    continue
                status = node.get("Status") or {}
                if status.get("State") != "ready":
                    continue
                ip = str(status.get("Addr") or "")
                if not _usable(ip):  # a manager advertised on 0.0.0.0: its manager address
                    ip = host_of(str((node.get("ManagerStatus") or {}).get("Addr") or ""))
                addresses.add(ip)
    return SwarmView(state, node_id, frozenset(a for a in addresses if _usable(a)))


@dataclass
class SwarmPeers:
    """Keeps the router's swarm-derived targets equal to the swarm's other nodes."""

    docker: DockerInfo
    router: Targets
    store: KeyValue
    port: int
    refresh: float = REFRESH
    current: set[str] = field(default_factory=set)  # targets we added, "IP:port"
    view: SwarmView | None = None
    error: str = ""
    synced: int = 0  # successful looks so far (the first one connects to every node)
    sleep: Callable[[float], Awaitable[None]] = trio.sleep

    def __post_init__(self) -> None:
        saved = self.store.get_json(STORE_KEY, [])
        if isinstance(saved, list):
            self.current = {str(t) for t in saved}

    def target(self, ip: str) -> str:
        return f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"

    async def sync(self) -> bool:
        """One look at the swarm and the targets brought in line. False if Docker did not answer."""
        try:
            view = await read_swarm(self.docker)
        except DockerError as exc:
            if str(exc) != self.error:
                log.info("swarm peers: cannot ask Docker yet: %s", exc)
            self.error = str(exc)
            return False
        self.error = ""
        if self.view is None or view.state != self.view.state:
            log.info("swarm: this node is %s%s", view.state, f" ({view.node_id})" if view.node_id else "")
        self.view = view
        wanted = {self.target(ip) for ip in view.addresses}
        # Leaving the swarm (or not being in one) forgets what the swarm gave us.
        gone = sorted(self.current - wanted)
        # The first look of every start connects to all of them, whatever was persisted.
        new = sorted(wanted if self.synced == 0 else wanted - self.current)
        self.synced += 1
        if gone:
            self.router.forget(gone)
            log.info("swarm peers: forgetting %s (no longer in the swarm)", ", ".join(gone))
        if new:
            errors = await self.router.connect(new)
            if errors:
                log.warning("swarm peers: not connecting to %s: %s", ", ".join(new), "; ".join(errors))
                new = []
            else:
                log.info("swarm peers: connecting to %s", ", ".join(new))
        if gone or new:
            self.current = (self.current - set(gone)) | set(new)
            self.store.put_json(STORE_KEY, sorted(self.current))
        return True

    async def run(self) -> None:
        """Sync now (every start: never only the first), then every `refresh` seconds."""
        delay = 1.0
        while True:
            if await self.sync():
                delay = 1.0
                await self.sleep(self.refresh)
            else:
                await self.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    def report(self) -> dict[str, Any]:
        view = self.view
        return {
            "State": view.state if view else "unknown",
            "NodeID": view.node_id if view else "",
            "Peers": sorted(self.current),
            "Error": self.error,
        }


def forget_dropped_setting_peers(router: Targets, store: KeyValue, peers: Sequence[str]) -> list[str]:
    """Peers from the plugin's settings (EXTRA_ARGS, WEAVE_PEERS) are what the settings say now.

    The router persists every target it is given, so a peer taken out of the settings would stay
    a target forever (the stale-peer bug again). At each start the ones dropped since the last
    start are forgotten. Returns them.
    """
    saved = store.get_json(SETTINGS_KEY, [])
    previous = {str(p) for p in saved} if isinstance(saved, list) else set()
    dropped = sorted(previous - set(peers))
    if dropped:
        router.forget(dropped)
        log.info("peers no longer in the plugin's settings: forgetting %s", ", ".join(dropped))
    store.put_json(SETTINGS_KEY, sorted(set(peers)))
    return dropped
