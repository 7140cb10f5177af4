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
from weavenet.plugin.options import GENERIC_OPTIONS, MULTICAST_OPTION, multicast_option, object_field
from weavenet.plugin.server import PluginService
from weavenet.plugin.state import NetworkRecord
from weavenet.plugin.v2.swarm import SwarmPeers

if TYPE_CHECKING:
    from weavenet.config import Settings
    from weavenet.ipam.allocator import Allocator
    from weavenet.store import Store

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.8  # Docker waits on us while we ask it


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
    """The global driver, with WEAVE_MULTICAST as the default for networks that say nothing."""

    def __init__(self, *args: Any, multicast_default: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.multicast_default = multicast_default

    async def create_network(self, body: Body) -> Body:
        reply = await super().create_network(body)  # validates, records with the option's value
        if self.multicast_default and explicit_multicast(object_field(body, "Options")) is None:
            self._switch_multicast_on(str(body["NetworkID"]))
        return reply

    async def _network(self, network_id: str) -> NetworkRecord:
        known = self.networks.get(network_id) is not None
        record = await super()._network(network_id)
        if known or record.multicast or not self.multicast_default or self.docker is None:
            return record
        # Learned from Docker just now (our store lost it): the default applies unless it says otherwise.
        with trio.move_on_after(LOOKUP_TIMEOUT):
            try:
                found = await self.docker.inspect_network(network_id) or {}
                if explicit_multicast(found.get("Options")) is None:
                    record = self._switch_multicast_on(network_id) or record
            except (DockerError, ValueError) as exc:
                log.debug("network %s: multicast default not applied: %s", network_id[:12], exc)
        return record

    def _switch_multicast_on(self, network_id: str) -> NetworkRecord | None:
        record = self.networks.get(network_id)
        if record is None or record.multicast:
            return record
        record = replace(record, multicast=True)
        self.networks.put(record)
        log.info(
            "network %s: multicast on (WEAVE_MULTICAST; the network sets no %s)", network_id[:12], MULTICAST_OPTION
        )
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
            "global",
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
