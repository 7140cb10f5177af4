"""The plugin under the machine's real dockerd, with real containers, as a user runs them.

Each test launches a real router in the machine's network namespace (where dockerd and its
containers' veths live). Docker finds the router's sockets, kept in the test's directory, through
spec files in /etc/docker/plugins, under names unique to the test (`wnt<hex>mesh` for weavemesh,
`wnt<hex>glob` for weave, `wnt<hex>-weave` for the automatic `weave` network): legacy discovery
reads /run/docker/plugins and the spec directories only, so `--plugin-dir` alone cannot point
dockerd elsewhere, and unique names keep parallel or aborted runs apart (Docker caches activation
per name for its lifetime). Everything made is removed after each test; what the run made on the
host (docker_gwbridge, the weave bridge, our FORWARD chain) is removed at the end of the module.
Across hosts: this Docker host meshed with a lab host over a link-local veth (below), and the global
driver between two more Docker daemons in test_plugin_cluster_store.py.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Container, Lab
from tests.plugin_helpers import (
    PREFIX,
    DockerRouter,
    HostSnapshot,
    PluginClient,
    RootLink,
    RootNamespaceLock,
    docker,
    import_busybox,
    stand_in,
    sweep_docker,
    wait_for,
)
from tests.prereq import missing
from tests.routers import LabRouter

pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """A busybox image imported for this run; the host as it was restored afterwards."""
    if not Path("/bin/busybox").exists():
        missing("/bin/busybox (Debian package busybox-static)")
    with RootNamespaceLock():  # no router of another run comes or goes while we look
        swept = sweep_docker()
        if swept:
            print(f"swept leftovers of dead plugin test runs: {', '.join(swept)}")
        snapshot = HostSnapshot.take()
    name = f"{PREFIX}{secrets.token_hex(3)}-busybox"
    import_busybox(name)
    try:
        yield name
    finally:
        docker("rmi", "-f", name, check=False)
        snapshot.restore()


@pytest.fixture
def router(image: str, tmp_path: Path) -> Iterator[DockerRouter]:
    router = DockerRouter(tmp_path)
    try:
        router.start()
        yield router
    except BaseException:
        print(router.log()[-4000:])
        raise
    finally:
        router.close()


def run(router: DockerRouter, image: str, name: str, network: str, *args: str) -> str:
    """`docker run -d` a sleeping container on `network`; its name is prefixed with the test's tag."""
    docker("run", "-d", "--init", "--name", f"{router.tag}-{name}", "--net", network, *args, image, "sleep", "600")
    return f"{router.tag}-{name}"


def exec_(container: str, *argv: str, check: bool = True) -> str:
    return docker("exec", container, *argv, check=check).stdout


def ethwe(container: str) -> list[str]:
    """The container's ethwe addresses, e.g. ['10.32.0.1/12']."""
    out = exec_(container, "ip", "-o", "-4", "addr", "show")
    return [m.group(2) for m in re.finditer(r"\d+: (ethwe\d+)\s+inet (\S+)", out)]


def has_multicast_route(container: str) -> bool:
    return "224.0.0.0/4 dev ethwe" in exec_(container, "ip", "route")


def veths() -> set[str]:
    """Our veth ends (vethwl…, vethwg…) in the machine's namespace."""
    return {n.name for n in Path("/sys/class/net").iterdir() if n.name.startswith("vethw")}


def pings(container: str, target: str) -> bool:
    return docker("exec", container, "ping", "-c", "1", "-W", "2", target, check=False).returncode == 0


def ipam_owned(router: DockerRouter) -> dict[str, set[str]]:
    """What the router's IPAM has handed out: ident → addresses."""
    reply = router.client.request("GET", "/ip", accept_json=True)
    assert reply.status == 200, reply.text
    return {entry["containerid"]: {a.split("/")[0] for a in entry["addrs"]} for entry in reply.json()["owned"]}


def ipam_holds(router: DockerRouter) -> set[str]:
    """Every address the router's IPAM has handed out."""
    return {address for addresses in ipam_owned(router).values() for address in addresses}


def established(report: dict[str, Any] | None) -> set[str]:
    """Nicknames of the peers a router has an established connection with, over its datapath."""
    if report is None:
        return set()
    return {
        c["Info"].split("(")[-1].rstrip(")")
        for c in report["Router"]["Connections"]
        if c["State"] == "established" and (c.get("Attrs") or {}).get("name") == "fastdp"
    }


def test_weave_network_appears_and_docker_run_gets_an_address_from_weavenet_ipam(router: DockerRouter, image: str):
    net = json.loads(docker("network", "inspect", router.network).stdout)[0]
    assert net["Driver"] == router.mesh and net["Scope"] == "local"
    assert net["IPAM"]["Driver"] == router.mesh
    assert net["IPAM"]["Config"][0]["Subnet"] == "10.32.0.0/12"
    assert net["Options"] == {"works.weave.multicast": "true"}

    started = time.monotonic()
    c1 = run(router, image, "c1", router.network)
    c2 = run(router, image, "c2", router.network)
    print(f"two docker run -d on the weave network: {time.monotonic() - started:.2f}s")
    assert ethwe(c1) == ["10.32.0.1/12"]  # the lowest free address: weavenet IPAM, not Docker's
    assert ethwe(c2) == ["10.32.0.2/12"]
    assert has_multicast_route(c1)
    mtu = exec_(c1, "cat", "/sys/class/net/ethwe0/mtu").strip()
    assert mtu == Path("/sys/class/net/weave/mtu").read_text().strip()  # the bridge's MTU
    assert pings(c1, "10.32.0.2") and pings(c2, "10.32.0.1")

    status = router.cli("status")
    assert "Service: plugin" in status and f"DefaultNetwork: {router.network} (10.32.0.0/12)" in status
    assert f"{router.mesh} (local, network+ipam)" in status and f"{router.glob} (global, network)" in status
    ps = router.cli("ps")
    for container in (c1, c2):
        cid = docker("inspect", "-f", "{{.Id}}", container).stdout.strip()
        mac = exec_(container, "cat", "/sys/class/net/ethwe0/address").strip()
        assert f"{cid[:12]} {mac} {ethwe(container)[0]}" in ps, ps
    calls = router.report()["Plugin"]["Calls"]
    slowest = max(c["MaxMs"] for c in calls.values())
    print("plugin calls:", {k: (v["Count"], v["MeanMs"], v["MaxMs"]) for k, v in calls.items()})
    assert slowest < 1000


def test_router_restart_keeps_a_running_containers_address_and_docker_does_not_reactivate(
    router: DockerRouter, image: str
):
    c1 = run(router, image, "c1", router.network)
    before = ethwe(c1)
    assert before == ["10.32.0.1/12"]

    router.restart()
    calls = router.report()["Plugin"]["Calls"]
    assert "Plugin.Activate" not in calls and "NetworkDriver.CreateNetwork" not in calls  # Docker's cache
    assert ethwe(c1) == before  # the interface was never touched
    c2 = run(router, image, "c2", router.network)  # served at once by the restarted router
    assert ethwe(c2) and ethwe(c2) != before, "the running container's address was handed out again"
    assert pings(c2, before[0].split("/")[0])
    docker("rm", "-f", c1, c2)
    c3 = run(router, image, "c3", router.network)
    assert ethwe(c3) == ["10.32.0.1/12"], "addresses of removed containers were not released"


def test_custom_subnet_static_ip_lowest_free_address_dns_by_name_and_network_rm(router: DockerRouter, image: str):
    subnet = f"{router.tag}-sub"
    docker("network", "create", "-d", router.mesh, "--ipam-driver", router.mesh, "--subnet", "10.40.0.0/16", subnet)
    c1 = run(router, image, "c1", subnet, "--ip", "10.40.0.1")
    c2 = run(router, image, "c2", subnet)
    assert ethwe(c1) == ["10.40.0.1/16"]  # the claim was honoured
    assert ethwe(c2) == ["10.40.0.2/16"]  # the lowest free address
    assert not has_multicast_route(c1)  # off unless asked for
    assert pings(c1, c2) and pings(c2, c1)  # by container name: Docker's embedded DNS

    taken = docker("run", "--rm", "--net", subnet, "--ip", "10.40.0.1", image, "true", check=False)
    assert taken.returncode != 0 and "address 10.40.0.1 is already in use" in taken.stderr, taken.stderr

    docker("rm", "-f", c1, c2)
    docker("network", "rm", subnet)  # the fake gateway's release is accepted, the pool released
    assert subnet not in docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [ip for ip in ipam_holds(router) if ip.startswith("10.40.")]


def test_multicast_option_on_off_and_invalid(router: DockerRouter, image: str):
    on, off, empty = f"{router.tag}-mc-on", f"{router.tag}-mc-off", f"{router.tag}-mc-empty"
    docker("network", "create", "-d", router.mesh, "--ipam-driver", router.mesh, "--subnet", "10.41.0.0/16", off)
    docker(
        "network", "create", "-d", router.mesh, "--ipam-driver", router.mesh, "--subnet", "10.42.0.0/16",
        "--opt", "works.weave.multicast=true", on,
    )  # fmt: skip
    docker(
        "network", "create", "-d", router.mesh, "--ipam-driver", router.mesh, "--subnet", "10.43.0.0/16",
        "--opt", "works.weave.multicast", empty,
    )  # fmt: skip
    assert not has_multicast_route(run(router, image, "off", off))
    assert has_multicast_route(run(router, image, "on", on))
    assert has_multicast_route(run(router, image, "empty", empty))

    bad = docker(
        "network", "create", "-d", router.mesh, "--opt", "works.weave.multicast=yes", f"{router.tag}-bad", check=False
    )
    assert bad.returncode != 0
    assert bad.stderr.strip() == (
        'Error response from daemon: NetworkDriver.CreateNetwork: unrecognized value "yes" for option '
        "works.weave.multicast: use true/false (or 1/0, t/f), or give the option without a value for true"
    )
    assert f"{router.tag}-bad" not in docker("network", "ls", "--format", "{{.Name}}").stdout.split()

    # a container already on a multicast network cannot join a second one: a clear error, no damage
    two = run(router, image, "two", router.network)
    before = veths()  # the veths of other runs' and this test's containers stay
    second = docker("network", "connect", on, two, check=False)
    assert second.returncode != 0
    assert "already has the multicast route 224.0.0.0/4 from another network" in second.stderr
    assert ethwe(two) == ["10.32.0.1/12"] and has_multicast_route(two)
    assert veths() - before == set(), "the refused endpoint's veth pair was left behind"


def test_the_global_driver_without_a_cluster_store(router: DockerRouter, image: str):
    """What this Docker (20.10, no --cluster-store, no swarm) does with a global legacy driver."""
    name = f"{router.tag}-global"
    result = docker("network", "create", "-d", router.glob, name, check=False)
    assert result.returncode != 0
    assert "This node is not a swarm manager" in result.stderr, result.stderr
    # Docker still called CreateNetwork then DeleteNetwork: nothing is left in the plugin's state
    # (GetCapabilities is asked once per driver name in the daemon's life, so it is not checked here.)
    calls = router.report()["Plugin"]["Calls"]
    assert calls.get("NetworkDriver.DeleteNetwork", {}).get("Count", 0) >= 1
    assert not [n for n in router.report()["Plugin"]["Networks"] if n["Driver"] == router.glob]


def test_many_concurrent_docker_runs_and_removals_answered_fast_with_no_address_lost_or_shared(
    router: DockerRouter, image: str
):
    """A stress through the real daemon: waves of concurrent `docker run` and `rm -f`."""

    def start(n: int) -> str:
        return run(router, image, f"s{n}", router.network)

    def endpoint_ids(names: list[str]) -> list[str]:
        fmt = "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}"
        return [docker("inspect", "-f", fmt, name).stdout.strip() for name in names]

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        first = list(pool.map(start, range(10)))
        wave1 = time.monotonic() - began
        addresses = [ethwe(name)[0] for name in first]
        assert len(set(addresses)) == 10, addresses
        # half go while as many new ones come
        gone, stay = first[:5], first[5:]
        gone_endpoints = endpoint_ids(gone)
        removals = [pool.submit(docker, "rm", "-f", name) for name in gone]
        second = list(pool.map(start, range(10, 15)))
        for removal in removals:
            removal.result()
        wave2 = time.monotonic() - began - wave1
    running = stay + second
    addresses = [ethwe(name)[0] for name in running]
    assert len(set(addresses)) == len(running), addresses
    assert ipam_holds(router) == {a.split("/")[0] for a in addresses}  # nothing lost, nothing leaked
    assert not [e for e in gone_endpoints if Path(f"/sys/class/net/vethwl{e[:9]}").exists()]

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda name: docker("rm", "-f", name), running))
    assert ipam_holds(router) == set()
    calls = router.report()["Plugin"]["Calls"]
    print(f"10 concurrent runs {wave1:.1f}s; 5 rm + 5 runs {wave2:.1f}s; calls (count, mean ms, max ms):")
    print({k: (v["Count"], v["MeanMs"], v["MaxMs"]) for k, v in calls.items()})
    assert calls["IpamDriver.RequestAddress"]["Count"] >= 15 and calls["IpamDriver.ReleaseAddress"]["Count"] >= 15
    assert not {k: v for k, v in calls.items() if v["Errors"]}, calls
    assert max(c["MaxMs"] for c in calls.values()) < 1000, calls
    client = PluginClient(router.socket)
    wait_for(client.answers, timeout=5, what="socket")


def test_what_a_killed_run_leaves_in_docker_is_swept(image: str, tmp_path: Path):
    """A run killed mid-test leaves containers and networks whose plugin is gone (each Docker call
    on them would wait 15 s for it); the sweeper removes them through a stand-in plugin."""
    dead = DockerRouter(tmp_path).start()
    try:
        sub = f"{dead.tag}-sub"
        docker("network", "create", "-d", dead.mesh, "--ipam-driver", dead.mesh, "--subnet", "10.44.0.0/16", sub)
        c1 = run(dead, image, "c1", sub)
        endpoint = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.EndpointID}}{{end}}", c1).stdout
        pair = {prefix + endpoint.strip()[:9] for prefix in ("vethwl", "vethwg")}  # the plugin's veth names
        dead.stop(signal.SIGKILL)
        began = time.monotonic()
        assert dead.tag in sweep_docker()
        print(f"swept in {time.monotonic() - began:.1f}s")
        assert not [n for n in docker("network", "ls", "--format", "{{.Name}}").stdout.split() if dead.tag in n]
        assert not docker("ps", "-aq", "--filter", f"name=^/{dead.tag}").stdout.strip()
        assert not pair & veths(), "the dead run's endpoint is still there"
        assert not list(Path("/etc/docker/plugins").glob(f"{dead.tag}*"))
    finally:
        dead.close()


def test_a_clean_stop_removes_the_weave_network_only_when_no_container_uses_it(router: DockerRouter, image: str):
    def networks() -> list[str]:
        return docker("network", "ls", "--format", "{{.Name}}").stdout.split()

    stopped = f"{router.tag}-stopped"
    docker("create", "--init", "--name", stopped, "--net", router.network, image, "sleep", "600")
    router.stop()
    assert router.network in networks(), "removed while a (stopped) container still uses it"
    router.start()
    assert router.report()["Plugin"]["Network"]["State"] == "exists"
    docker("start", stopped)  # the stopped container comes back on its network
    assert ethwe(stopped) == ["10.32.0.1/12"]

    docker("rm", "-f", stopped)
    began = time.monotonic()
    router.stop()
    print(f"clean stop with network removal: {time.monotonic() - began:.2f}s")
    assert router.network not in networks()  # no network left pointing at a plugin that is gone
    router.start()
    assert router.report()["Plugin"]["Network"]["State"] == "created"


def test_addresses_of_containers_removed_while_the_router_was_down_are_freed_at_the_next_start(
    router: DockerRouter, image: str
):
    """Docker's release of an address is lost while the router is down, and a container we attached
    by id can go without a word to us: the next start frees both (once Docker has answered), keeps
    every address in use (a running container's, a network's real gateway), and a network made
    before the restart can still be removed."""
    subnet = f"{router.tag}-sub"
    docker(
        "network", "create", "-d", router.mesh, "--ipam-driver", router.mesh, "--subnet", "10.40.0.0/16",
        "--gateway", "10.40.255.254", subnet,
    )  # fmt: skip
    on_subnet = run(router, image, "sub", subnet, "--ip", "10.40.0.7")
    kept = run(router, image, "kept", router.network)
    gone = run(router, image, "gone", router.network)
    assert (ethwe(kept), ethwe(gone)) == (["10.32.0.1/12"], ["10.32.0.2/12"])
    attached = f"{router.tag}-att"
    docker("run", "-d", "--init", "--name", attached, "--net", "none", image, "sleep", "600")
    attached_id = docker("inspect", "-f", "{{.Id}}", attached).stdout.strip()
    assert router.cli("attach", attached).split()[-1] == "10.32.0.3/12"
    assert ipam_owned(router)[attached_id] == {"10.32.0.3"}

    router.stop(signal.SIGKILL)
    with stand_in(router.tag):  # Docker's teardown calls reach a stand-in: they never reach IPAM
        docker("rm", "-f", gone, attached)
    began = time.monotonic()
    router.start()
    wait_for(lambda: attached_id not in ipam_owned(router), timeout=30, what="the attached container's address")
    print(f"container-id prune after the start: {time.monotonic() - began:.1f}s")
    wait_for(lambda: "10.32.0.2" not in ipam_holds(router), timeout=90, what="the lost release to be made good")
    print(f"lost-release prune after the start: {time.monotonic() - began:.1f}s")
    pruned = router.report()["Plugin"]["Pruned"]
    assert pruned["Containers"] + pruned["Destroyed"] == 1 and pruned["Addresses"] == 1, pruned
    assert {"10.32.0.1", "10.40.0.7", "10.40.255.254"} <= ipam_holds(router)  # in use: kept
    assert ethwe(kept) == ["10.32.0.1/12"] and ethwe(on_subnet) == ["10.40.0.7/16"]
    assert ethwe(run(router, image, "new", router.network)) == ["10.32.0.2/12"]  # the freed one, lowest

    docker("rm", "-f", on_subnet)
    docker("network", "rm", subnet)  # after the restart: DeleteNetwork, gateway release, ReleasePool
    assert not [ip for ip in ipam_holds(router) if ip.startswith("10.40.")]


def lab_pings(container: Container, address: str) -> bool:
    return container.run(["ping", "-c", "1", "-W", "2", address], check=False).returncode == 0


@pytest.mark.lab(hosts=1)
def test_a_docker_container_and_a_lab_hosts_container_ping_each_other_through_the_mesh(
    router: DockerRouter, image: str, lab: Lab
):
    """This machine's Docker host and a lab host running a second router, meshed over a veth with
    a link-local /30 (the only path between them): the Docker container and the lab host's attached
    container ping each other both ways; cut the link and the pings fail; heal it and they return."""
    host = lab.hosts[0]
    c1 = run(router, image, "c1", router.network)  # this router's IPAM makes the ring first
    docker_ip = ethwe(c1)[0].split("/")[0]
    with RootLink(host, router.tag) as link:
        print(f"underlay {link.subnet}: machine {link.root_address}, {host.label} {link.host_address}")
        remote = LabRouter(host, [f"{link.root_address}:{router.port}"])
        remote.wait_ready()
        began = time.monotonic()
        wait_for(
            lambda: host.label in established(router.report()) and router.tag in established(remote.report()),
            timeout=60,
            what="the mesh link over the datapath, both ways",
        )
        print(f"mesh link established: {time.monotonic() - began:.2f}s")
        container = host.add_container("c")
        remote_ip = str(ipaddress.ip_interface(remote.cli("attach", container.path).split()[-1]).ip)
        assert remote_ip != docker_ip and ipaddress.ip_address(remote_ip) in ipaddress.ip_network("10.32.0.0/12")
        wait_for(lambda: pings(c1, remote_ip), timeout=30, what="the Docker container to reach the lab's")
        assert lab_pings(container, docker_ip)

        link.cut()
        began = time.monotonic()
        wait_for(lambda: not pings(c1, remote_ip), timeout=30, what="the ping to fail with the link cut")
        assert not lab_pings(container, docker_ip)
        link.heal()
        wait_for(
            lambda: pings(c1, remote_ip) and lab_pings(container, docker_ip),
            timeout=90,
            what="the pings to return after healing",
        )
        print(f"cut, then healed and pinging again: {time.monotonic() - began:.2f}s")


def test_a_container_attached_by_id_gives_its_address_back_when_docker_destroys_it(router: DockerRouter, image: str):
    """Docker never tells the IPAM driver about `weavenet attach`; its event stream does."""
    attached = f"{router.tag}-att"
    docker("run", "-d", "--init", "--name", attached, "--net", "none", image, "sleep", "600")
    attached_id = docker("inspect", "-f", "{{.Id}}", attached).stdout.strip()
    address = router.cli("attach", attached).split()[-1]
    assert ipam_owned(router)[attached_id] == {address.split("/")[0]}
    docker("stop", "-t", "1", attached)  # stopped, not gone: it keeps its claim
    assert attached_id in ipam_owned(router)
    began = time.monotonic()
    docker("rm", attached)
    wait_for(lambda: attached_id not in ipam_owned(router), timeout=10, what="the destroyed container's address")
    print(f"freed {time.monotonic() - began:.2f}s after docker rm")
    assert router.report()["Plugin"]["Pruned"]["Destroyed"] == 1


def test_a_network_name_taken_by_another_driver_is_shown_in_status_and_left_alone(image: str, tmp_path: Path):
    router = DockerRouter(tmp_path)
    try:
        docker("network", "create", "-d", "bridge", router.network)  # someone else's `weave`
        router.start(wait_network=False)
        wait_for(lambda: router.report()["Plugin"]["Network"]["State"] == "failed", timeout=30, what="the clash")
        status = router.cli("status")
        assert (
            f"DefaultNetwork: {router.network} failed: a Docker network named '{router.network}' already exists "
            f"with driver 'bridge'; remove it (docker network rm {router.network}) or give --plugin-network "
            "another name"
        ) in status, status
        assert docker("network", "inspect", "-f", "{{.Driver}}", router.network).stdout.strip() == "bridge"
        assert PluginClient(router.socket).answers()  # the plugin still serves the other networks
        router.stop()
        assert docker("network", "inspect", "-f", "{{.Driver}}", router.network).stdout.strip() == "bridge"
    finally:
        router.close()
