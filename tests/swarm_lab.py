"""A two-node Docker swarm of our own, each node running weavenet's managed (V2) plugin.

On tests/docker_hosts.py's two hosts (underlay 192.168.253.0/24): a dockerd each, listening on
<workdir>/<name>/docker.sock (for the tests) and on the host's private /run/docker.sock (the
plugin's default `docker` mount, as on a real machine). The plugin is built once from this machine's
weavenet (the same folder `weavenet plugin build` makes), created in both daemons and enabled
before the swarm exists (docker-lab.md G11), with its state mount pointed at the host's own
directory (`docker plugin set NAME state.source=DIR`: every host of a real swarm has its own
/var/lib/weavenet; these two share one filesystem). No peer is configured: a is the swarm's
manager (`swarm init --advertise-addr` its underlay address), b joins it as a worker, and the
routers have to find each other through the swarm. Each node's network events are streamed from
before the plugin exists (SwarmNode.events): a node deletes its local copy of a swarm network after
`docker network rm` has returned, and its plugin must not be disabled before that (Docker would
drop the release and count the plugin in use for good; see weavenet.plugin.v2.lifecycle).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from tests.docker_hosts import DOCKERD_FLAGS, DockerHost, DockerHostsLab, wait_for, weavenet_json
from tests.plugin_helpers import NetworkEvents
from weavenet.plugin.v2.build import write_folder

PLUGIN = "wntv2/net-plugin:swarm"
MESH_PORT = 6783

HOST_BODY = r"""
"$DOCKERD" -H unix://$D/docker.sock -H unix:///run/docker.sock FLAGS > $D/dockerd.log 2>&1 &
PIDS="$!"
""".replace("FLAGS", DOCKERD_FLAGS)


class SwarmNode(DockerHost):
    events: NetworkEvents | None = None  # from the lab's start on

    @property
    def state_dir(self) -> str:
        return str(self.dir / "state")

    def local_copies(self) -> list[str]:
        """Networks of the plugin this node's daemon made a local copy of and has not destroyed."""
        assert self.events is not None, f"no event stream on {self.name}"
        return self.events.local_copies(PLUGIN)

    def report(self) -> dict[str, Any]:
        """The plugin's router's /report, from this host's 127.0.0.1:6784 (as `weavenet report`)."""
        result: dict[str, Any] = weavenet_json(self, "report")
        return result

    def api_answers(self) -> bool:
        try:
            self.report()
        except AssertionError:
            return False
        return True

    def swarm_peers(self) -> list[str]:
        """The connection targets the plugin took from the swarm."""
        return list(self.report()["Plugin"]["V2"]["Swarm"]["Peers"])

    def targets(self) -> list[str]:
        return list(self.report()["Router"]["Targets"])

    def established_with(self) -> set[str]:
        """Underlay IPs of the hosts this router has an established connection with."""
        connections = self.report()["Router"]["Connections"]
        return {str(c["Address"]).rsplit(":", 1)[0] for c in connections if c.get("State") == "established"}

    def swarm_state(self) -> str:
        return self.docker("info", "-f", "{{.Swarm.LocalNodeState}}").stdout.strip()

    def enable_plugin(self) -> float:
        began = time.monotonic()
        self.docker("plugin", "enable", PLUGIN, timeout=90)
        wait_for(self.api_answers, timeout=30, what=f"the plugin's router API on {self.name}", interval=0.2)
        return time.monotonic() - began

    def disable_plugin(self) -> None:
        self.docker("plugin", "disable", "-f", PLUGIN)

    def logs(self) -> str:
        """The daemon's log (which holds the plugin's own lines) and the router's report."""
        try:
            report = str(self.report())
        except AssertionError as error:
            report = str(error)
        return f"{super().logs()}\n--- {self.name} report\n{report}"


class SwarmLab(DockerHostsLab):
    """Manager a, worker b, the plugin enabled on both; use as a context manager."""

    PREFIX = "wsw"
    SUBNET = "192.168.253"
    HOST_BODY = HOST_BODY
    HOST_CLASS = SwarmNode

    def __init__(self, tag: str | None = None) -> None:
        super().__init__(tag)
        self.timings: dict[str, float] = {}

    @property
    def hosts(self) -> tuple[SwarmNode, SwarmNode]:
        return self.a, self.b  # type: ignore[return-value]

    @property
    def manager(self) -> SwarmNode:
        return self.hosts[0]

    @property
    def worker(self) -> SwarmNode:
        return self.hosts[1]

    def after_start(self) -> None:
        for node in self.hosts:  # before any network of the plugin
            node.events = NetworkEvents(node.dir / "network-events.log", f"{self.tag}-probe", node.cli).start()
        began = time.monotonic()
        folder = self.workdir / "plugin"
        write_folder(folder, PLUGIN)
        self.timings["plugin folder"] = time.monotonic() - began
        for node in self.hosts:
            began = time.monotonic()
            node.docker("plugin", "create", PLUGIN, str(folder), timeout=300)
            self.timings[f"plugin create on {node.name}"] = time.monotonic() - began
            (self.workdir / node.name / "state").mkdir(mode=0o700)
            node.docker("plugin", "set", PLUGIN, f"state.source={node.state_dir}")
            self.timings[f"plugin enable on {node.name}"] = node.enable_plugin()
        shutil.rmtree(folder)
        began = time.monotonic()
        self.manager.docker("swarm", "init", "--advertise-addr", self.manager.address)
        self.join(self.worker)
        self.timings["swarm init and join"] = time.monotonic() - began

    def join(self, node: SwarmNode) -> None:
        """`node` joins the manager's swarm as a worker; returns once the manager lists it ready
        with the plugin (services are only scheduled on nodes that advertise it)."""
        token = self.manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        node.docker("swarm", "join", "--token", token, f"{self.manager.address}:2377", timeout=120)
        node_id = node.docker("info", "-f", "{{.Swarm.NodeID}}").stdout.strip()
        wait_for(
            lambda: (
                self.manager.docker("node", "inspect", "-f", "{{.Status.State}}", node_id).stdout.strip() == "ready"
            ),
            timeout=60,
            interval=0.5,
            what=f"{node.name} to be a ready swarm node",
        )
        for member in (self.manager.docker("info", "-f", "{{.Swarm.NodeID}}").stdout.strip(), node_id):
            wait_for(
                lambda member=member: (
                    PLUGIN
                    in self.manager.docker(
                        "node", "inspect", "-f", "{{json .Description.Engine.Plugins}}", member
                    ).stdout
                ),
                timeout=60,
                interval=1,
                what="the swarm to see the plugin on every node",
            )

    def mesh_target(self, node: SwarmNode) -> str:
        return f"{node.address}:{MESH_PORT}"

    def close(self) -> None:
        try:
            for node in self.hosts:
                if node.events is not None:
                    node.events.close()
        finally:
            super().close()
