"""The router's plugin side in V2 mode: one global NetworkDriver on the managed plugin's socket.

Docker reaches a managed plugin at `/run/docker/plugins/<socket>` inside the plugin (the host's
`/run/docker/plugins/<plugin id>/`); the driver's name in Docker is the plugin's full NAME:TAG.
No `weavemesh` socket, no IPAM driver, no automatic `weave` network: addresses come from swarm's
IPAM (see config_json.py for why). A network's `works.weave.multicast` option is honoured per
network; networks that do not set it follow WEAVE_MULTICAST. The swarm follower (swarm.py) runs
beside the sockets. Everything else (serving, stats, report, ps, network names) is the legacy
service's, reused as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.network_driver import Body, NetworkDriver, PeerCallback
from weavenet.plugin.options import (
    GENERIC_OPTIONS,
    MULTICAST_OPTION,
    DriverError,
    multicast_option,
    object_field,
)
from weavenet.plugin.server import PluginService
from weavenet.plugin.state import NetworkRecord, NetworkTable
from weavenet.plugin.v2.swarm import SwarmPeers

if TYPE_CHECKING:
    from weavenet.config import Settings
    from weavenet.ipam.allocator import Allocator
    from weavenet.store import Store

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.8  # Docker waits on us while we ask it
EXPLICIT_KEY = "plugin.v2.multicast_options"  # network id → the works.weave.multicast it was created with


def explicit_multicast(options: Mapping[str, Any] | None) -> bool | None:
    """The network's own works.weave.multicast (CreateNetwork's generic map, or a flat map), or None."""
    if not options:
        return None
    generic = options.get(GENERIC_OPTIONS)
    flat = generic if isinstance(generic, Mapping) else options
    if MULTICAST_OPTION not in flat:
        return None
    value = flat[MULTICAST_OPTION]
    if isinstance(value, bool):
        return value
    return multicast_option(str(value))


class V2NetworkDriver(NetworkDriver):
    """The global driver, with WEAVE_MULTICAST as the default for networks that say nothing.

    What each network said (on, off, or nothing) is kept apart from the resolved flag, so that a
    changed WEAVE_MULTICAST applies to existing networks too after the plugin is enabled again.
    """

    def __init__(
        self,
        name: str,
        networks: NetworkTable,
        *,
        docker: DockerClient | None,
        on_peer: PeerCallback | None = None,
        on_network: Callable[[], None] | None = None,
        multicast_default: bool = False,
    ) -> None:
        super().__init__(name, "global", networks, docker=docker, on_peer=on_peer, on_network=on_network)
        self.multicast_default = multicast_default
        saved = networks.store.get_json(EXPLICIT_KEY, {}) if networks.store is not None else {}
        self.explicit: dict[str, bool] = {str(k): bool(v) for k, v in saved.items()} if isinstance(saved, dict) else {}

    def _resolved(self, network_id: str) -> bool:
        return self.explicit.get(network_id, self.multicast_default)

    def _remember(self, network_id: str, explicit: bool | None) -> None:
        if explicit is None:
            if self.explicit.pop(network_id, None) is None:
                return
        else:
            self.explicit[network_id] = explicit
        if self.networks.store is not None:
            self.networks.store.put_json(EXPLICIT_KEY, dict(sorted(self.explicit.items())))

    async def create_network(self, body: Body) -> Body:
        reply = await super().create_network(body)  # validates the option, records the network
        network_id = str(body["NetworkID"])
        self._remember(network_id, explicit_multicast(object_field(body, "Options")))
        self._sync_record(network_id)
        return reply

    async def delete_network(self, body: Body) -> Body:
        reply = await super().delete_network(body)
        self._remember(str(body.get("NetworkID") or ""), None)
        return reply

    async def _network(self, network_id: str) -> NetworkRecord:
        known = self.networks.get(network_id) is not None
        record = await super()._network(network_id)
        if not known and self.docker is not None:
            # Learned from Docker just now (our store lost it): what did the network itself say?
            with trio.move_on_after(LOOKUP_TIMEOUT):
                try:
                    found = await self.docker.inspect_network(network_id) or {}
                    self._remember(network_id, explicit_multicast(found.get("Options")))
                except (DockerError, DriverError) as exc:
                    log.debug("network %s: its multicast option is unknown: %s", network_id[:12], exc)
        return self._sync_record(network_id) or record

    def _sync_record(self, network_id: str) -> NetworkRecord | None:
        """The stored record with the multicast flag this network has now (for Join and status)."""
        record = self.networks.get(network_id)
        if record is None:
            return None
        multicast = self._resolved(network_id)
        if record.multicast != multicast:
            record = replace(record, multicast=multicast)
            self.networks.put(record)
            if network_id not in self.explicit:
                log.info("network %s: multicast %s (WEAVE_MULTICAST)", network_id[:12], "on" if multicast else "off")
        return record


class V2PluginService(PluginService):
    """The managed plugin's sockets: just one, `<directory>/<socket>`, driver name `ref`."""

    def __init__(
        self,
        settings: Settings,
        directory: Path,
        *,
        ref: str,
        socket: str,
        store: Store | None,
        allocator: Callable[[], Allocator | None],
        on_peer: PeerCallback | None = None,
        multicast_default: bool = False,
        swarm: SwarmPeers | None = None,
        docker: DockerClient | None = None,
    ) -> None:
        # The legacy parts (weavemesh, weave, the `weave` network) stay off whatever the settings say.
        legacy_off = replace(settings, plugin_mesh_name="", plugin_name="", plugin_network="")
        super().__init__(legacy_off, directory, store=store, allocator=allocator, on_peer=on_peer, docker=docker)
        self.ref = ref
        self.multicast_default = multicast_default
        self.swarm = swarm
        driver = V2NetworkDriver(
            ref,
            self.networks,
            docker=self.docker,
            on_peer=on_peer,
            on_network=self._network_changed,
            multicast_default=multicast_default,
        )
        self.drivers.append(driver)
        plugin_socket = self._socket(driver, None)
        plugin_socket.path = directory / socket
        self.sockets.append(plugin_socket)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(super().run)
            log.info("plugin: managed (v2) plugin %s ready", self.ref)
            if self.swarm is not None:
                nursery.start_soon(self.swarm.run)
            task_status.started()

    def report(self) -> dict[str, Any]:
        report = super().report()
        report["V2"] = {
            "Name": self.ref,
            "MulticastDefault": self.multicast_default,
            "Swarm": self.swarm.report() if self.swarm is not None else None,
        }
        return report
