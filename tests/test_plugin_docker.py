"""The plugin under the machine's real dockerd, with real containers, as a user runs them.

Each test launches a real router in the machine's network namespace (where dockerd and its
containers' veths live). Docker finds the router's sockets, kept in the test's directory, through
spec files in /etc/docker/plugins, under names unique to the test (`wnt<hex>mesh` for weavemesh,
`wnt<hex>glob` for weave, `wnt<hex>-weave` for the automatic `weave` network): legacy discovery
reads /run/docker/plugins and the spec directories only, so `--plugin-dir` alone cannot point
dockerd elsewhere, and unique names keep parallel or aborted runs apart (Docker caches activation
per name for its lifetime). Everything made is removed after each test; what the run made on the
host (docker_gwbridge, the weave bridge, our FORWARD chain) is removed at the end of the module.
Cross-host behaviour needs the Rust datapath: see test_plugin_cluster_store.py.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugin_helpers import (
    PREFIX,
    DockerRouter,
    HostSnapshot,
    PluginClient,
    docker,
    import_busybox,
    sweep_docker,
    wait_for,
)
from tests.prereq import missing

pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """A busybox image imported for this run; the host as it was restored afterwards."""
    if not Path("/bin/busybox").exists():
        missing("/bin/busybox (Debian package busybox-static)")
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


def pings(container: str, target: str) -> bool:
    return docker("exec", container, "ping", "-c", "1", "-W", "2", target, check=False).returncode == 0


def ipam_holds(router: DockerRouter) -> set[str]:
    """Every address the router's IPAM has handed out."""
    reply = router.client.request("GET", "/ip", accept_json=True)
    assert reply.status == 200, reply.text
    return {a.split("/")[0] for entry in reply.json()["owned"] for a in entry["addrs"]}


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
    second = docker("network", "connect", on, two, check=False)
    assert second.returncode != 0
    assert "already has the multicast route 224.0.0.0/4 from another network" in second.stderr
    assert ethwe(two) == ["10.32.0.1/12"] and has_multicast_route(two)
    assert not [n for n in Path("/sys/class/net").iterdir() if n.name.startswith("vethwg")]


def test_the_global_driver_without_a_cluster_store(router: DockerRouter, image: str):
    """What this Docker (20.10, no --cluster-store, no swarm) does with a global legacy driver."""
    name = f"{router.tag}-global"
    result = docker("network", "create", "-d", router.glob, name, check=False)
    assert result.returncode != 0
    assert "This node is not a swarm manager" in result.stderr, result.stderr
    # Docker still called CreateNetwork then DeleteNetwork: nothing is left in the plugin's state
    calls = router.report()["Plugin"]["Calls"]
    assert calls.get("NetworkDriver.GetCapabilities", {}).get("Count", 0) >= 1
    assert not [n for n in router.report()["Plugin"]["Networks"] if n["Driver"] == router.glob]


def test_plugin_answers_docker_fast_under_parallel_docker_runs(router: DockerRouter, image: str):
    import concurrent.futures

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        names = list(pool.map(lambda n: run(router, image, f"p{n}", router.network), range(6)))
    wall = time.monotonic() - began
    addresses = [ethwe(name)[0] for name in names]
    assert len(set(addresses)) == 6
    print(f"6 parallel docker run -d: {wall:.2f}s")
    calls = router.report()["Plugin"]["Calls"]
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
        run(dead, image, "c1", sub)
        dead.stop(signal.SIGKILL)
        began = time.monotonic()
        assert dead.tag in sweep_docker()
        print(f"swept in {time.monotonic() - began:.1f}s")
        assert not [n for n in docker("network", "ls", "--format", "{{.Name}}").stdout.split() if dead.tag in n]
        assert not docker("ps", "-aq", "--filter", f"name=^/{dead.tag}").stdout.strip()
        assert not [n for n in Path("/sys/class/net").iterdir() if n.name.startswith("vethw")]
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
