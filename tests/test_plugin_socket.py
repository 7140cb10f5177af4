"""The plugin's sockets on a real router, spoken to as dockerd speaks to them.

A router runs in a lab host (its own network namespace, so every veth and the weave bridge it makes
stay there) with `--plugin-dir` in the test's directory and no Docker API; the test plays dockerd:
every endpoint in the order Docker calls them, malformed bodies, many calls at once, a restart with
no new Activate or CreateNetwork. The same router under the real dockerd: test_plugin_docker.py.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lab import Host, Lab
from tests.plugin_helpers import PluginClient, wait_for
from tests.routers import LabRouter

pytestmark = [pytest.mark.lab(hosts=1)]

EID = "7d3f547d054042806c8c94a543adc3c737d33f585b8fb2b5ed4e9d674cf563f9"
NID = "67148f12b53a35bf07da5a51bfc73cff0183f1bc3cd7b95767d13605a3b255ea"


def start_router(host: Host, *extra: str) -> tuple[LabRouter, PluginClient, PluginClient]:
    plugins = host.logdir / "plugins"
    router = LabRouter(host, extra=["--plugin-dir", str(plugins), "--docker-api", "", *extra])
    router.wait_ready()
    mesh, glob = PluginClient(plugins / "weavemesh.sock"), PluginClient(plugins / "weave.sock")
    wait_for(mesh.answers, timeout=10, what="weavemesh.sock")
    return router, mesh, glob


def links(host: Host) -> dict[str, dict[str, object]]:
    """Interfaces in the host: name → {mtu, master, mac, up}."""
    found = {}
    with host.iproute() as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
        for link in ipr.link("dump"):
            found[link.get("ifname")] = {
                "mtu": link.get("mtu"),
                "master": names.get(link.get("master")),
                "mac": link.get("address"),
                "up": bool(link["flags"] & 1),
            }
    return found


def create_network(client: PluginClient, network_id: str, multicast: str | None, pool: str = "10.32.0.0/12") -> None:
    generic = {} if multicast is None else {"works.weave.multicast": multicast}
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": generic},
        "IPv4Data": [{"AddressSpace": "weavelocal", "Gateway": pool, "Pool": pool}],
        "IPv6Data": [],
    }
    assert client.ok("NetworkDriver.CreateNetwork", body) == {}


def endpoint(network_id: str, endpoint_id: str, address: str = "", mac: str = "") -> dict[str, object]:
    return {
        "NetworkID": network_id,
        "EndpointID": endpoint_id,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": mac},
        "Options": {"com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": []},
    }


def test_docker_run_and_rm_call_by_call(lab: Lab):
    (host,) = lab.hosts
    router, mesh, glob = start_router(host)

    # activation, as Docker does it on first use of each name
    assert mesh.ok("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert glob.ok("Plugin.Activate") == {"Implements": ["NetworkDriver"]}
    assert mesh.ok("NetworkDriver.GetCapabilities")["Scope"] == "local"
    assert glob.ok("NetworkDriver.GetCapabilities")["Scope"] == "global"

    # docker network create --subnet 10.40.0.0/16 (plugin IPAM): RequestPool → CreateNetwork
    pool = mesh.ok("IpamDriver.RequestPool", {"AddressSpace": "weavelocal", "Pool": "10.40.0.0/16", "V6": False})
    assert pool["PoolID"] == "weave-10.40.0.0/16-10.40.0.0/16"
    assert pool["Data"] == {"com.docker.network.gateway": "10.40.0.0/16"}
    create_network(mesh, NID, "")

    # docker run --ip 10.40.0.1, then a second container: claim, then the lowest free address
    static = mesh.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "10.40.0.1", "Options": None})
    assert static["Address"] == "10.40.0.1/16"
    dynamic = mesh.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    assert dynamic["Address"] == "10.40.0.2/16"

    reply = mesh.ok("NetworkDriver.CreateEndpoint", endpoint(NID, EID, static["Address"]))
    here = links(host)
    host_end, guest_end = "vethwl7d3f547d0", "vethwg7d3f547d0"
    assert here[host_end]["master"] == "weave" and here[host_end]["up"]
    assert here[host_end]["mtu"] == here["weave"]["mtu"] == here[guest_end]["mtu"]
    assert not here[guest_end]["up"] and here[guest_end]["master"] is None
    assert reply == {"Interface": {"MacAddress": here[guest_end]["mac"]}}  # no Address echoed (Docker refuses it)
    assert "already exists" in mesh.err("NetworkDriver.CreateEndpoint", endpoint(NID, EID))

    join = mesh.ok(
        "NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "/nonexistent", "Options": {}}
    )
    assert join == {
        "InterfaceName": {"SrcName": guest_end, "DstPrefix": "ethwe"},
        "StaticRoutes": [{"Destination": "224.0.0.0/4", "RouteType": 1}],
    }
    ids = {"NetworkID": NID, "EndpointID": EID}
    assert mesh.ok("NetworkDriver.ProgramExternalConnectivity", {**ids, "Options": {}}) == {}
    assert mesh.ok("NetworkDriver.EndpointOperInfo", ids) == {"Value": {}}

    # docker rm -f: Revoke → Leave → DeleteEndpoint → ReleaseAddress
    assert mesh.ok("NetworkDriver.RevokeExternalConnectivity", ids) == {}
    assert mesh.ok("NetworkDriver.Leave", ids) == {}
    assert mesh.ok("NetworkDriver.DeleteEndpoint", ids) == {}
    assert host_end not in links(host) and guest_end not in links(host)
    assert mesh.ok("NetworkDriver.DeleteEndpoint", ids) == {}  # already gone: still {}
    assert mesh.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.40.0.1"}) == {}
    again = mesh.ok("IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    assert again["Address"] == "10.40.0.1/16"  # freed, so lowest again

    # docker network rm: ReleaseAddress(fake gateway) → ReleasePool → DeleteNetwork
    assert mesh.ok("IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": "10.40.0.0"}) == {}
    assert mesh.ok("IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}
    assert mesh.ok("NetworkDriver.DeleteNetwork", {"NetworkID": NID}) == {}
    report = router.report()
    assert report is not None and report["Plugin"]["Networks"] == []


def test_requested_mac_is_set_and_not_returned_and_join_without_multicast_has_no_route(lab: Lab):
    (host,) = lab.hosts
    _, mesh, _ = start_router(host)
    create_network(mesh, NID, None)
    reply = mesh.ok("NetworkDriver.CreateEndpoint", endpoint(NID, EID, "10.32.0.9/12", mac="02:42:0a:20:00:09"))
    assert reply == {"Interface": {}}
    assert links(host)["vethwg7d3f547d0"]["mac"] == "02:42:0a:20:00:09"
    join = mesh.ok("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "", "Options": {}})
    assert join == {"InterfaceName": {"SrcName": "vethwg7d3f547d0", "DstPrefix": "ethwe"}}
    assert mesh.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID}) == {}


def test_second_multicast_network_in_one_container_is_a_clear_error(lab: Lab):
    (host,) = lab.hosts
    _, mesh, _ = start_router(host)
    create_network(mesh, NID, "true")
    container = host.add_container("c1")  # already has the route, as from a first multicast network
    container.run(["ip", "link", "add", "ethwe0", "type", "veth", "peer", "name", "spare0"])
    container.run(["ip", "link", "set", "ethwe0", "up"])
    container.run(["ip", "route", "add", "224.0.0.0/4", "dev", "ethwe0"])
    mesh.ok("NetworkDriver.CreateEndpoint", endpoint(NID, EID))
    error = mesh.err(
        "NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": container.path, "Options": {}}
    )
    assert "already has the multicast route 224.0.0.0/4" in error
    mesh.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})  # Docker's rollback
    assert "vethwl7d3f547d0" not in links(host)


def test_unknown_endpoint_and_malformed_bodies(lab: Lab):
    (host,) = lab.hosts
    _, mesh, _ = start_router(host)
    create_network(mesh, NID, None)
    error = mesh.err("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": "e" * 64, "SandboxKey": ""})
    assert error == "unknown endpoint eeeeeeeeeeee: interface vethwgeeeeeeeee not found"
    bad = mesh.post("NetworkDriver.CreateEndpoint", raw=b'{"NetworkID": "x", "EndpointID": ')
    assert bad.status == 400 and bad.text.startswith("Unable to decode JSON payload")
    assert mesh.post("NetworkDriver.CreateEndpoint", raw=b"[]").status == 400
    assert mesh.post("NetworkDriver.NoSuchThing", {}).status == 404
    assert mesh.post("IpamDriver.RequestAddress", {"PoolID": "weavepool"}).json == {
        "Err": "Unrecognized pool ID: weavepool"
    }
    error = mesh.err("NetworkDriver.CreateEndpoint", endpoint(NID, EID, mac="not-a-mac"))
    assert error.startswith("invalid MacAddress 'not-a-mac'")
    # nothing half-made: a CreateEndpoint that fails midway (a multicast MAC: the kernel refuses it
    # on the second step, after the pair exists) leaves no veth
    error = mesh.err("NetworkDriver.CreateEndpoint", endpoint(NID, EID, mac="01:00:5e:00:00:01"))
    assert "could not set up veth pair" in error
    assert not [name for name in links(host) if name.startswith("vethw")]


def test_many_calls_at_once_answer_in_milliseconds(lab: Lab):
    (host,) = lab.hosts
    router, mesh, _ = start_router(host)
    create_network(mesh, NID, "")
    pool = "weave-10.32.0.0/12-10.32.0.0/12"

    def container_lifecycle(n: int) -> tuple[str, list[float]]:
        client = PluginClient(mesh.path)
        eid = f"{n:02d}" + "ab" * 31
        ids = {"NetworkID": NID, "EndpointID": eid}
        timings = []
        for method, body in [
            ("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "", "Options": {}}),
            ("NetworkDriver.CreateEndpoint", endpoint(NID, eid)),
            ("NetworkDriver.Join", {**ids, "SandboxKey": "", "Options": {}}),
            ("NetworkDriver.EndpointOperInfo", ids),
            ("NetworkDriver.Leave", ids),
            ("NetworkDriver.DeleteEndpoint", ids),
        ]:
            reply = client.post(method, body)
            assert reply.status == 200, (method, reply.text)
            timings.append(reply.elapsed)
            if method == "IpamDriver.RequestAddress":
                address = reply.json["Address"]
        client.close()
        return address, timings

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool_:
        results = list(pool_.map(container_lifecycle, range(32)))
    wall = time.monotonic() - began
    addresses = [a for a, _ in results]
    latencies = sorted(t for _, ts in results for t in ts)
    assert len(set(addresses)) == 32, "an address was handed out twice"
    assert not [name for name in links(host) if name.startswith("vethw")]
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99)]
    print(f"{len(latencies)} calls from 16 threads in {wall:.2f}s: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert latencies[-1] < 1.0, f"slowest call took {latencies[-1]:.2f}s; Docker must never wait a second"
    report = router.report()
    assert report is not None
    calls = report["Plugin"]["Calls"]
    assert calls["NetworkDriver.CreateEndpoint"]["Count"] == 32


def test_restart_needs_no_new_activation_and_keeps_network_settings(lab: Lab):
    (host,) = lab.hosts
    router, mesh, _ = start_router(host)
    create_network(mesh, NID, "true")
    sockets = sorted(p.name for p in (host.logdir / "plugins").iterdir())
    assert sockets == ["weave.sock", "weavemesh.sock"]

    router.process.kill()  # SIGTERM: a clean stop removes the sockets
    router.process.wait()
    assert not list((host.logdir / "plugins").iterdir())

    router.process.restart()
    router.wait_ready()
    wait_for(mesh.answers, timeout=10, what="weavemesh.sock after restart")
    mesh.ok("NetworkDriver.CreateEndpoint", endpoint(NID, EID))
    join = mesh.ok("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": "", "Options": {}})
    assert join["StaticRoutes"] == [{"Destination": "224.0.0.0/4", "RouteType": 1}]  # from the store
    mesh.ok("NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})


def test_a_stale_socket_is_replaced_and_a_live_one_is_never_taken(lab: Lab, tmp_path: Path):
    (host,) = lab.hosts
    router, mesh, _ = start_router(host)
    router.process.kill(9)  # SIGKILL: the sockets stay behind, stale
    router.process.wait()
    assert (host.logdir / "plugins" / "weavemesh.sock").exists()
    router.process.restart()
    router.wait_ready()
    wait_for(mesh.answers, timeout=10, what="weavemesh.sock to be replaced")

    # a second router pointed at the same directory must refuse, not steal the live socket
    second = subprocess.run(
        [
            *["ip", "netns", "exec", host.name],
            *[router.argv[0], "launch", "--foreground", "--state-dir", str(tmp_path / "state2")],
            *["--http-addr", str(tmp_path / "api2.sock"), "--port", "6790"],
            *["--plugin-dir", str(host.logdir / "plugins"), "--docker-api", ""],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "is served by another process" in second.stderr + second.stdout
    assert mesh.answers()


def test_endpoints_docker_gave_up_on_while_the_plugin_was_down_are_removed_at_start(lab: Lab):
    """A container removed while no plugin answers: Docker drops its Leave/DeleteEndpoint after 15 s of
    retries and moves the container end back here under its own name. The next start removes that pair;
    an endpoint whose container end is in a container stays."""
    (host,) = lab.hosts
    router, mesh, _ = start_router(host)
    create_network(mesh, NID, None)
    live, dead = EID, "e" + EID[1:]  # the veth names keep the first 9 characters
    container = host.add_container("c1")
    for endpoint_id in (live, dead):
        mesh.ok("NetworkDriver.CreateEndpoint", endpoint(NID, endpoint_id))
        mesh.ok("NetworkDriver.Join", {"NetworkID": NID, "EndpointID": endpoint_id, "SandboxKey": "", "Options": {}})
    with host.iproute() as ipr:  # what Docker does at Join: the container end into the container, renamed
        (index,) = ipr.link_lookup(ifname="vethwg" + live[:9])
        ipr.link("set", index=index, net_ns_fd=container.name, ifname="ethwe0")
    router.process.kill()  # SIGTERM; the dead endpoint's container goes while the plugin is down
    router.process.wait()
    assert {"vethwl" + dead[:9], "vethwg" + dead[:9]} <= set(links(host))

    router.process.restart()
    router.wait_ready()
    wait_for(mesh.answers, timeout=10, what="weavemesh.sock after restart")
    after = links(host)
    assert "vethwl" + dead[:9] not in after and "vethwg" + dead[:9] not in after
    assert after["vethwl" + live[:9]]["master"] == "weave" and "ethwe0" in container.links()
    report = router.report()
    assert report is not None and report["Plugin"]["Pruned"]["Endpoints"] == 1
