"""The managed (V2) plugin across a real two-node swarm: peers come from the swarm, services span hosts.

Two Docker daemons of our own (tests/swarm_lab.py: manager a, worker b, each in its own
namespaces, the plugin enabled on both with no peer configured); the machine's dockerd is never
touched. The routers find each other only through the swarm (the manager's /nodes, the worker's
RemoteManagers); a global service's tasks on the two hosts, and an attachable container, ping each
other across the underlay through the routers' datapaths (this network has no other path: no
overlay driver, no routes between the hosts' bridges). Node changes are followed both ways, and a
plugin restarted while its node left the swarm drops the swarm's old peer at once (Weave Net's
stale-peer bug: it only asked Docker on its very first start).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker_hosts import DOCKERD, IMAGE, dockerd_version
from tests.plugin_helpers import BUSYBOX, wait_for
from tests.prereq import missing
from tests.swarm_lab import PLUGIN, SwarmLab, SwarmNode

pytestmark = [pytest.mark.docker, pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(900)]

FOLLOW = 40.0  # seconds for a node change to reach the routers (the follower looks every 10 s)


@pytest.fixture(scope="module")
def swarm_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmLab]:
    if dockerd_version() is None or not Path(DOCKERD).exists():
        missing("dockerd (Debian package docker.io)")
    if not BUSYBOX.exists():
        missing("/bin/busybox (Debian package busybox-static)")
    SwarmLab.sweep()
    lab = SwarmLab()
    try:
        with lab:
            print("\nswarm lab up in {:.1f}s: {}".format(
                lab.setup_seconds, ", ".join(f"{k} {v:.1f}s" for k, v in lab.timings.items())
            ))  # fmt: skip
            try:
                yield lab
            finally:
                lab.keep_logs(tmp_path_factory.mktemp("swarm-lab"))  # the lab's own directory goes at close
    except BaseException:
        print(lab.logs())
        raise


def network_name(lab: SwarmLab, suffix: str) -> str:
    return f"{lab.tag}-{suffix}"


def tasks_on(node: SwarmNode, service: str) -> list[str]:
    out = node.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").stdout
    return out.split()


def address(node: SwarmNode, container: str, network: str) -> str:
    template = '{{(index .NetworkSettings.Networks "' + network + '").IPAddress}}'
    return node.docker("inspect", "-f", template, container).stdout.strip()


def task_with_address(node: SwarmNode, service: str, network: str) -> tuple[str, str] | None:
    """A running task of `service` on `node` and its address on `network`, once Docker shows one."""
    for container in tasks_on(node, service):
        if ip := address(node, container, network):
            return container, ip
    return None


def pings(node: SwarmNode, container: str, ip: str) -> bool:
    return node.docker("exec", container, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0


def reaches(node: SwarmNode, container: str, ip: str, timeout: float = 30) -> None:
    """Wait until `container` on `node` pings `ip`: a new container's path (ARP, the routers' routes
    across the underlay) settles after Docker has returned."""
    wait_for(
        lambda: pings(node, container, ip),
        timeout=timeout,
        interval=0.5,
        what=f"{container} on {node.name} to ping {ip}",
    )


def meshed(lab: SwarmLab) -> bool:
    """Each node's router has an established connection with the other (both sides)."""
    manager, worker = lab.manager, lab.worker
    return manager.established_with() == {worker.address} and worker.established_with() == {manager.address}


def wait_for_each_other(lab: SwarmLab) -> None:
    """Until each node's router has exactly the other node as its swarm peer."""
    for node, other in ((lab.manager, lab.worker), (lab.worker, lab.manager)):
        wait_for(
            lambda node=node, other=other: node.swarm_peers() == [lab.mesh_target(other)],
            timeout=FOLLOW,
            what=f"{node.name}'s router to take {other.name} from the swarm",
        )


def test_the_routers_find_each_other_through_the_swarm(swarm_lab: SwarmLab) -> None:
    manager, worker = swarm_lab.manager, swarm_lab.worker
    for node in (manager, worker):
        assert node.report()["Plugin"]["V2"]["Name"] == PLUGIN
    # the manager knows every ready node (/nodes); the worker knows the managers (/info)
    wait_for_each_other(swarm_lab)
    wait_for(lambda: meshed(swarm_lab), timeout=30, what="the mesh between the nodes, both ways")
    for node in (manager, worker):
        assert node.report()["Plugin"]["V2"]["Swarm"]["State"] == "active"


def test_a_global_service_spans_both_hosts_and_its_tasks_ping_across(swarm_lab: SwarmLab) -> None:
    manager, worker = swarm_lab.manager, swarm_lab.worker
    net = network_name(swarm_lab, "net")
    service = network_name(swarm_lab, "svc")
    net_id = manager.docker("network", "create", "-d", PLUGIN, "--attachable", net).stdout.strip()
    try:
        manager.docker(
            "service", "create", "--detach", "--no-resolve-image", "--stop-grace-period", "1s", "--init",
            "--endpoint-mode", "dnsrr", "--mode", "global", "--name", service, "--network", net,
            IMAGE, "sleep", "600",
        )  # fmt: skip
        (on_manager, ip_manager), (on_worker, ip_worker) = (
            wait_for(
                lambda node=node: task_with_address(node, service, net),
                timeout=90,
                interval=0.5,
                what=lambda node=node: (
                    f"a task of {service} on {node.name} with an address on {net}: "
                    + manager.docker("service", "ps", "--no-trunc", service, check=False).stdout[-800:]
                ),
            )
            for node in (manager, worker)
        )
        assert ip_manager != ip_worker
        began = time.monotonic()
        reaches(manager, on_manager, ip_worker)
        print(f"\nfirst cross-host ping between tasks: {time.monotonic() - began:.2f}s")
        reaches(worker, on_worker, ip_manager)

        # an attachable container on the worker reaches the task on the manager
        client = network_name(swarm_lab, "client")
        worker.docker("run", "-d", "--init", "--name", client, "--network", net, IMAGE, "sleep", "600")
        reaches(worker, client, ip_manager)
        reaches(manager, on_manager, address(worker, client, net))

        # the bytes crossed the underlay through the datapath: cut it and the ping stops
        for node in (manager, worker):
            node.inside("iptables", "-I", "INPUT", "-i", "ul0", "-p", "udp", "--dport", "6783", "-j", "DROP")
        try:
            wait_for(
                lambda: not pings(manager, on_manager, ip_worker),
                timeout=30,
                what="the ping to fail with the datapath's port cut",
            )
        finally:
            for node in (manager, worker):
                node.inside("iptables", "-D", "INPUT", "-i", "ul0", "-p", "udp", "--dport", "6783", "-j", "DROP")
        reaches(manager, on_manager, ip_worker, timeout=60)  # once healed
    finally:
        manager.docker("service", "rm", service, check=False)
        worker.docker("rm", "-f", network_name(swarm_lab, "client"), check=False)
        for node in (manager, worker):
            wait_for(lambda node=node: not tasks_on(node, service), timeout=60, what=f"the tasks to go on {node.name}")
        wait_for(
            lambda: manager.docker("network", "rm", net, check=False).returncode == 0,
            timeout=30,
            interval=1,
            what=f"network {net} to be removable",
        )
        # Each node deletes its local copy after the rm has returned; a plugin disabled before that (the
        # next test's) never gets Docker's release and counts as in use for the daemon's life.
        for node in (manager, worker):
            assert node.events is not None
            node.events.sync()  # the creates are all in the file: none can pass for destroyed
            wait_for(
                lambda node=node: (
                    not node.docker("network", "ls", "-q", "--filter", f"id={net_id}").stdout.strip()
                    and not node.local_copies()
                ),
                timeout=90,
                interval=0.5,
                what=lambda node=node: (
                    f"{node.name}'s dockerd to destroy its copy of {net} (left: {node.local_copies()})"
                ),
            )


def test_node_changes_are_followed_and_a_restart_drops_stale_swarm_peers(swarm_lab: SwarmLab) -> None:
    manager, worker = swarm_lab.manager, swarm_lab.worker
    wait_for(lambda: meshed(swarm_lab), timeout=FOLLOW, what="the mesh to be up, both ways")

    # The worker's plugin is down while its node leaves the swarm: what it persisted (the manager
    # as a swarm peer) is stale when it starts again, and that first look must drop it.
    worker.disable_plugin()
    worker.docker("swarm", "leave", "--force", timeout=120)
    assert worker.swarm_state() == "inactive"
    worker.enable_plugin()
    wait_for(
        lambda: worker.report()["Plugin"]["V2"]["Swarm"]["State"] == "inactive",
        timeout=FOLLOW,
        what="the restarted plugin to look at the swarm",
    )
    assert worker.swarm_peers() == []
    assert swarm_lab.mesh_target(manager) not in worker.targets()

    # The manager sees the worker's node go down and forgets it too
    wait_for(
        lambda: manager.swarm_peers() == [] and swarm_lab.mesh_target(worker) not in manager.targets(),
        timeout=FOLLOW + 30,  # + the manager's heartbeat timeout for the node to be marked down
        what="the manager's router to forget the node that left",
    )

    # Joining again is followed on both sides, without a restart, and the mesh comes back
    swarm_lab.join(worker)
    wait_for_each_other(swarm_lab)
    wait_for(lambda: meshed(swarm_lab), timeout=30, what="the mesh to return, both ways")
