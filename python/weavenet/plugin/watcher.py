"""Docker's container events, as Weave Net's plugin watched them: a destroyed container's addresses go.

IPAM holds addresses under a container id when a container was attached by id (`weavenet attach
<container>`, `POST /ip/<id>` with check-alive); Docker never tells the IPAM driver about those, so
the router follows `/events` and frees them when Docker reports the container destroyed (Weave
Net's `destroy`; its `die` timer is not needed: a stopped container keeps its id and its claim).
Containers destroyed while the stream was down are caught up with plugin.prune each time it
opens. It never frees an ident that is not a container id held as a container, and never
blocks Docker: the stream is read by one task, which waits (with backoff) while Docker is away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from weavenet.ipam.errors import IpamError
from weavenet.plugin import prune
from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.docker_network import inventory
from weavenet.plugin.ipam_driver import Allocator

log = logging.getLogger(__name__)

RETRY_MAX = 60.0  # seconds between attempts to reopen the stream
EVENTS = {"type": ["container"], "event": ["destroy"]}


class ContainerWatcher:
    """Follows Docker's container events for as long as it runs; `freed` counts what it gave back."""

    def __init__(self, docker: DockerClient, allocator: Callable[[], Allocator | None]) -> None:
        self.docker = docker
        self.allocator = allocator
        self.freed = 0
        self.opened = 0  # times the stream was (re)opened

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.docker.follow(
                    "/events", self._on_event, query={"filters": json.dumps(EVENTS)}, on_open=self._on_open
                )
                log.info("plugin: Docker ended its event stream; reopening it")
                delay = 1.0
            except DockerError as exc:
                if delay == 1.0:
                    log.info("plugin: not following Docker's events for now: %s", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _on_open(self) -> None:
        # Subscribed: whatever is destroyed from now on arrives as an event, so one look at
        # Docker's containers settles what ended while the stream was not open (or before start).
        self.opened += 1
        allocator = self.allocator()
        if allocator is None:
            return
        try:
            stock = await inventory(self.docker)
        except DockerError as exc:
            log.warning("plugin: cannot list Docker's containers after reconnecting: %s", exc)
            return
        self.freed += len(await prune.prune_gone_containers(allocator, stock))

    async def _on_event(self, event: Any) -> None:
        if not isinstance(event, dict) or event.get("Type") != "container" or event.get("Action") != "destroy":
            return
        container_id = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
        allocator = self.allocator()
        if allocator is None or not prune.CONTAINER_ID.fullmatch(container_id):
            return
        if container_id not in allocator.owned_by_containers():
            return
        try:
            released = await allocator.free(container_id)
        except IpamError as exc:
            log.warning("plugin: cannot free the addresses of destroyed container %s: %s", container_id[:12], exc)
            return
        if released:
            self.freed += 1
            log.info(
                "plugin: freed %s of container %s: Docker destroyed it",
                ", ".join(map(str, released)),
                container_id[:12],
            )
