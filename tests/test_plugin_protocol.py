"""The plugin's protocol, call by call, without a host: what Docker sends and what it gets back.

The sockets' routers are driven in-process (no kernel, no Docker): these tests pin the replies, the
error mapping (400 plain text / 500 {"Err"} / 404), the option parsing and the IPAM driver's rules
against an in-memory allocator. The same calls go over a real socket to a real router in
test_plugin_socket.py, and through the real Docker daemon in test_plugin_docker.py.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from weavenet.api.server import Request
from weavenet.config import Settings
from weavenet.ipam.errors import IpamError
from weavenet.plugin import ipam_driver
from weavenet.plugin.ipam_driver import parse_pool_id, pool_id
from weavenet.plugin.options import DriverError, multicast_from_options, multicast_option
from weavenet.plugin.server import CONTENT_TYPE, PluginService, format_status

RANGE = IPv4Network("10.32.0.0/12")


class MemoryAllocator:
    """The allocator's contract as the IPAM driver relies on it: lowest free first, `_` files by address."""

    def __init__(self, ipalloc_range: IPv4Network = RANGE, *, stall: bool = False) -> None:
        self.range = ipalloc_range
        self.default_subnet = ipalloc_range
        self.held: dict[str, list[IPv4Interface]] = {}
        self.stall = stall

    def _used(self) -> set[IPv4Address]:
        return {c.ip for cidrs in self.held.values() for c in cidrs}

    async def allocate(
        self, ident: str, subnet: IPv4Network | None = None, *, is_container: bool = False, timeout: float | None = 30
    ) -> IPv4Interface:
        if self.stall:
            await trio.sleep_forever()
        subnet = subnet or self.default_subnet
        for ip in subnet.hosts():
            if ip not in self._used():
                cidr = IPv4Interface((ip, subnet.prefixlen))
                self.held.setdefault(str(ip) if ident == "_" else ident, []).append(cidr)
                return cidr
        raise IpamError(f"no free addresses in {subnet}", "unavailable")

    async def claim(
        self,
        ident: str,
        address: IPv4Interface,
        *,
        is_container: bool = False,
        no_error_on_unknown: bool = False,
        timeout: float | None = 30,
    ) -> None:
        if self.stall:
            await trio.sleep_forever()
        if address.ip not in self._used():
            self.held.setdefault(str(address.ip) if ident == "_" else ident, []).append(address)

    async def free(self, ident: str, address: IPv4Address | None = None) -> list[IPv4Interface]:
        if ident == "_" and address is not None:
            ident = str(address)
        return self.held.pop(ident, [])

    def owned(self) -> dict[str, list[IPv4Interface]]:
        return {k: list(v) for k, v in self.held.items()}

    def owned_by_containers(self) -> dict[str, list[IPv4Interface]]:
        return {}  # the IPAM driver allocates as `_`, never as a container


class Plugin:
    """A PluginService's two sockets, called in-process."""

    def __init__(self, allocator: MemoryAllocator | None = None, **settings: Any) -> None:
        self.allocator = allocator
        self.peers: list[str] = []
        config = Settings(state_dir=Path("/nonexistent"), docker_api=None, **settings)

        async def on_peer(address: str) -> None:
            self.peers.append(address)

        self.service = PluginService(config, Path("/nonexistent"), store=None, allocator=lambda: self.allocator)
        for driver in self.service.drivers:
            driver.on_peer = on_peer
        self.sockets = {s.driver: s for s in self.service.sockets}

    def call(
        self,
        method: str,
        body: Any = None,
        *,
        driver: str = "weavemesh",
        raw: bytes | None = None,
        clock: trio.abc.Clock | None = None,
    ):
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        request = Request(method="POST", path=f"/{method}", query={}, headers={}, body=payload)

        async def dispatch():
            return await self.sockets[driver].router.dispatch(request)

        response = trio.run(dispatch, clock=clock)
        if response.content_type == CONTENT_TYPE:
            return response.status, json.loads(response.body)
        return response.status, response.body.decode()

    def ok(self, method: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        status, reply = self.call(method, body, **kwargs)
        assert status == 200, (method, status, reply)
        return reply

    def err(self, method: str, body: Any = None, **kwargs: Any) -> str:
        status, reply = self.call(method, body, **kwargs)
        assert status == 500 and isinstance(reply, dict) and set(reply) == {"Err"}, (method, status, reply)
        assert "\n" not in reply["Err"]
        return reply["Err"]


@pytest.fixture
def plugin() -> Plugin:
    return Plugin(MemoryAllocator())


# --- activation and capabilities ---


def test_each_socket_activates_with_its_interfaces_and_scope(plugin: Plugin):
    assert plugin.ok("Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert plugin.ok("Plugin.Activate", driver="weave") == {"Implements": ["NetworkDriver"]}
    assert plugin.ok("NetworkDriver.GetCapabilities") == {"Scope": "local", "ConnectivityScope": "local"}
    assert plugin.ok("NetworkDriver.GetCapabilities", driver="weave") == {
        "Scope": "global",
        "ConnectivityScope": "global",
    }
    assert plugin.ok("IpamDriver.GetCapabilities") == {"RequiresMACAddress": False, "RequiresRequestReplay": False}
    assert plugin.ok("IpamDriver.GetDefaultAddressSpaces") == {
        "LocalDefaultAddressSpace": "weavelocal",
        "GlobalDefaultAddressSpace": "weaveglobal",
    }


def test_the_global_socket_has_no_ipam(plugin: Plugin):
    status, body = plugin.call("IpamDriver.RequestPool", {}, driver="weave")
    assert (status, body) == (404, "404 page not found\n")


def test_driver_names_follow_the_settings():
    named = Plugin(MemoryAllocator(), plugin_mesh_name="wntmesh", plugin_name="")
    assert list(named.sockets) == ["wntmesh"]
    assert named.sockets["wntmesh"].path == Path("/nonexistent/wntmesh.sock")


# --- bad input ---


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "Unable to decode JSON payload"),
        (b"\xff\xfe", "Unable to decode JSON payload"),
        (b"[1, 2]", "expected a JSON object"),
        (b'"text"', "expected a JSON object"),
        (b'{"NetworkID": 7}', "field NetworkID: expected a string"),
        (b'{"NetworkID": "n1", "Options": []}', "field Options: expected an object"),
        (b'{"NetworkID": "n1", "IPv4Data": {}}', "field IPv4Data: expected an array"),
    ],
)
def test_undecodable_bodies_are_400_with_a_message(plugin: Plugin, raw: bytes, fragment: str):
    status, body = plugin.call("NetworkDriver.CreateNetwork", raw=raw)
    assert status == 400
    assert fragment in body and body.count("\n") == 1


def test_unknown_methods_are_404(plugin: Plugin):
    assert plugin.call("NetworkDriver.Teleport", {}) == (404, "404 page not found\n")
    assert plugin.call("Plugin.Deactivate", {}) == (404, "404 page not found\n")


def test_missing_ids_are_errors_naming_the_field(plugin: Plugin):
    assert plugin.err("NetworkDriver.CreateNetwork", {}) == "missing NetworkID"
    assert plugin.err("NetworkDriver.CreateEndpoint", {"NetworkID": "n1"}) == "missing EndpointID"
    assert plugin.err("IpamDriver.RequestAddress", {}) == "missing PoolID"


def test_create_endpoint_without_an_interface_is_refused(plugin: Plugin):
    body = {"NetworkID": "n1", "EndpointID": "e1", "Interface": None}
    assert "Not supported" in plugin.err("NetworkDriver.CreateEndpoint", body)


# --- networks and multicast ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", True),
        ("true", True),
        ("1", True),
        ("T", True),
        ("True", True),
        ("0", False),
        ("f", False),
        ("FALSE", False),
    ],
)
def test_multicast_option_takes_go_bools_and_empty_means_on(value: str, expected: bool):
    assert multicast_option(value) is expected


@pytest.mark.parametrize("value", ["yes", "on", "2", "tru", " true", "TRue"])
def test_other_multicast_values_name_the_option(value: str):
    with pytest.raises(DriverError, match=r'unrecognized value ".*" for option works\.weave\.multicast'):
        multicast_option(value)


def test_multicast_is_off_unless_asked():
    assert multicast_from_options(None) is False
    assert multicast_from_options({"com.docker.network.generic": {}}) is False
    assert multicast_from_options({"com.docker.network.generic": {"works.weave.multicast": ""}}) is True
    assert multicast_from_options({"works.weave.multicast": "true"}) is True  # AllocateNetwork's flat map


def create_network(plugin: Plugin, network_id: str, generic: dict[str, Any] | None = None, **kwargs: Any):
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.enable_ipv6": False, "com.docker.network.generic": generic or {}},
        "IPv4Data": [{"AddressSpace": "weavelocal", "Gateway": "10.32.0.0/12", "Pool": "10.32.0.0/12"}],
        "IPv6Data": [],
    }
    return plugin.call("NetworkDriver.CreateNetwork", body, **kwargs)


def test_create_network_records_multicast_and_a_bad_value_fails_it(plugin: Plugin):
    assert create_network(plugin, "n-on", {"works.weave.multicast": ""}) == (200, {})
    assert create_network(plugin, "n-off", {"e.custom": "1"}) == (200, {})
    status, reply = create_network(plugin, "n-bad", {"works.weave.multicast": "bogus"})
    assert status == 500 and reply["Err"].startswith('unrecognized value "bogus" for option works.weave.multicast')
    networks = {n["ID"]: n for n in plugin.service.report()["Networks"]}
    assert networks["n-on"]["Multicast"] is True
    assert networks["n-off"]["Multicast"] is False
    assert "n-bad" not in networks
    assert plugin.ok("NetworkDriver.DeleteNetwork", {"NetworkID": "n-on"}) == {}
    assert plugin.ok("NetworkDriver.DeleteNetwork", {"NetworkID": "n-on"}) == {}  # again: still fine
    assert "n-on" not in {n["ID"] for n in plugin.service.report()["Networks"]}


def test_swarm_allocation_echoes_options_and_checks_multicast(plugin: Plugin):
    body = {"NetworkID": "a7vtme77d5vz5jr9h5fbmhycd", "Options": {"works.weave.multicast": "1"}, "IPv4Data": []}
    assert plugin.ok("NetworkDriver.AllocateNetwork", body) == {"Options": {"works.weave.multicast": "1"}}
    body["Options"] = {"works.weave.multicast": "maybe"}
    assert "works.weave.multicast" in plugin.err("NetworkDriver.AllocateNetwork", body)
    assert plugin.ok("NetworkDriver.FreeNetwork", {"NetworkID": "a7vtme77d5vz5jr9h5fbmhycd"}) == {}


def test_no_op_calls_answer_empty(plugin: Plugin):
    ids = {"NetworkID": "n1", "EndpointID": "e1"}
    assert plugin.ok("NetworkDriver.ProgramExternalConnectivity", {**ids, "Options": {}}) == {}
    assert plugin.ok("NetworkDriver.RevokeExternalConnectivity", ids) == {}
    assert plugin.ok("NetworkDriver.Leave", ids) == {}
    assert plugin.ok("NetworkDriver.EndpointOperInfo", ids) == {"Value": {}}
    assert plugin.ok("NetworkDriver.GwAllocCheck", {"Options": {}}) == {"SkipIPv4": False, "SkipIPv6": False}


def test_node_discovery_connects_to_other_nodes_only(plugin: Plugin):
    def discover(method: str, address: str, self_: bool) -> None:
        body = {"DiscoveryType": 1, "DiscoveryData": {"Address": address, "BindAddress": "", "Self": self_}}
        assert plugin.ok(method, body, driver="weave") == {}

    discover("NetworkDriver.DiscoverNew", "192.168.252.1", True)
    discover("NetworkDriver.DiscoverNew", "192.168.252.2", False)
    discover("NetworkDriver.DiscoverNew", "192.168.252.2", False)  # repeated: connect once
    discover("NetworkDriver.DiscoverDelete", "192.168.252.2", False)
    assert plugin.peers == ["192.168.252.2"]
    assert plugin.call("NetworkDriver.DiscoverNew", {"DiscoveryType": "1"}, driver="weave")[0] == 400


def test_join_on_a_network_nobody_knows_is_an_error_naming_it(plugin: Plugin):
    body = {"NetworkID": "f" * 64, "EndpointID": "e" * 64, "SandboxKey": "", "Options": {}}
    assert (
        plugin.err("NetworkDriver.Join", body)
        == "unable to find network info for ffffffffffff: no Docker API configured"
    )


# --- IPAM ---


def request_pool(plugin: Plugin, pool: str = "", sub_pool: str = "", **extra: Any):
    body = {"AddressSpace": "weavelocal", "Pool": pool, "SubPool": sub_pool, "Options": {}, "V6": False, **extra}
    return plugin.call("IpamDriver.RequestPool", body)


def address(plugin: Plugin, pool: str, wanted: str = "", options: dict[str, str] | None = None) -> str:
    body = {"PoolID": pool, "Address": wanted, "Options": options}
    return plugin.ok("IpamDriver.RequestAddress", body)["Address"]


def test_pool_ids_round_trip_in_weave_nets_format():
    subnet, iprange = IPv4Network("10.40.0.0/16"), IPv4Network("10.40.8.0/24")
    assert pool_id(subnet, iprange) == "weave-10.40.0.0/16-10.40.8.0/24"
    assert parse_pool_id(pool_id(subnet, iprange)) == (subnet, iprange)
    for bad in [
        "weavepool",
        "weave-10.40.0.0/16",
        "other-10.40.0.0/16-10.40.0.0/16",
        "weave-x-y",
        "weave-10.1.0.0/16-10.2.0.0/24",
    ]:
        with pytest.raises(DriverError, match="Unrecognized pool ID"):
            parse_pool_id(bad)


def test_explicit_pool_gets_a_fake_gateway_docker_never_asks_for(plugin: Plugin):
    assert request_pool(plugin, "10.40.0.0/16") == (
        200,
        {
            "PoolID": "weave-10.40.0.0/16-10.40.0.0/16",
            "Pool": "10.40.0.0/16",
            "Data": {"com.docker.network.gateway": "10.40.0.0/16"},
        },
    )
    assert request_pool(plugin, "10.40.0.0/16", "10.40.8.0/24")[1]["PoolID"] == "weave-10.40.0.0/16-10.40.8.0/24"


def test_dynamic_pool_is_the_default_subnet(plugin: Plugin, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ipam_driver, "host_overlap", lambda subnet: None)
    assert request_pool(plugin)[1]["Pool"] == "10.32.0.0/12"


def test_dynamic_pool_overlapping_a_host_route_fails_instead_of_looping(
    plugin: Plugin, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(ipam_driver, "host_overlap", lambda subnet: "the host route to 10.32.0.0/12")
    status, reply = request_pool(plugin)
    assert status == 500
    assert reply["Err"] == (
        "default subnet 10.32.0.0/12 overlaps the host route to 10.32.0.0/12; "
        "create the network with an explicit --subnet"
    )
    # a global network (no such check in Docker) is not refused
    assert request_pool(plugin, AddressSpace="weaveglobal")[0] == 200


@pytest.mark.parametrize(
    ("pool", "sub_pool", "v6", "fragment"),
    [
        ("10.40.0.0/33", "", False, "invalid subnet '10.40.0.0/33'"),
        ("banana", "", False, "invalid subnet 'banana'"),
        ("fd00::/64", "", False, "IPv4 only"),
        ("", "", True, "IPv4 only"),
        ("10.40.0.0/16", "10.41.0.0/24", False, "ip-range 10.41.0.0/24 is not inside subnet 10.40.0.0/16"),
        ("192.168.7.0/24", "", False, "subnet 192.168.7.0/24 is outside weavenet's allocation range 10.32.0.0/12"),
    ],
)
def test_bad_pools_are_refused_with_a_reason(plugin: Plugin, pool: str, sub_pool: str, v6: bool, fragment: str):
    status, reply = request_pool(plugin, pool, sub_pool, V6=v6)
    assert status == 500 and fragment in reply["Err"], reply


def test_addresses_lowest_free_first_static_claims_and_release(plugin: Plugin):
    pool = "weave-10.40.0.0/16-10.40.0.0/16"
    assert address(plugin, pool, "10.40.0.1") == "10.40.0.1/16"  # --ip: Docker sends no prefix
    assert address(plugin, pool) == "10.40.0.2/16"  # the lowest free one
    assert address(plugin, pool) == "10.40.0.3/16"
    assert "already in use" in plugin.err("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "10.40.0.2"})
    assert "not in subnet" in plugin.err("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "10.41.0.9"})
    assert "invalid address" in plugin.err("IpamDriver.RequestAddress", {"PoolID": pool, "Address": "10.40.0"})
    assert plugin.ok("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": "10.40.0.2"}) == {}
    assert plugin.ok("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": "10.40.0.2"}) == {}  # again: fine
    assert address(plugin, pool) == "10.40.0.2/16"


def test_the_fake_gateway_release_is_ignored_and_a_real_gateway_is_a_claim(plugin: Plugin):
    pool = "weave-10.40.0.0/16-10.40.0.0/16"
    gateway = {"RequestAddressType": "com.docker.network.gateway"}
    assert address(plugin, pool, "10.40.255.254", gateway) == "10.40.255.254/16"  # --gateway
    assert plugin.ok("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": "10.40.0.0"}) == {}
    assert plugin.allocator is not None and "10.40.255.254" in plugin.allocator.held
    assert plugin.ok("IpamDriver.ReleasePool", {"PoolID": pool}) == {}
    assert "Unrecognized pool ID" in plugin.err("IpamDriver.ReleasePool", {"PoolID": "weavepool"})


def test_ipam_off_is_a_clear_error():
    plugin = Plugin(None)
    assert "IPAM is not running" in plugin.err("IpamDriver.RequestPool", {"Pool": "10.40.0.0/16"})


def test_an_ipam_call_that_cannot_be_served_answers_err_within_a_second():
    plugin = Plugin(MemoryAllocator(stall=True))
    # Virtual time: what cuts the stalled allocator off is the driver's guard, not how busy the machine is.
    clock = trio.testing.MockClock(autojump_threshold=0)
    body = {"PoolID": "weave-10.32.0.0/12-10.32.0.0/12", "Address": ""}
    reply = plugin.err("IpamDriver.RequestAddress", body, clock=clock)
    assert "could not allocate in 10.32.0.0/12 within" in reply
    assert clock.current_time() == pytest.approx(ipam_driver.IPAM_GUARD)
    assert clock.current_time() < 1.0  # Docker must never wait on us for more than a second
    assert plugin.allocator is not None and plugin.allocator.held == {}


# --- status ---


def test_status_shows_drivers_sockets_and_the_default_network(plugin: Plugin):
    create_network(plugin, "n" * 64, {"works.weave.multicast": "true"})
    report = plugin.service.report()
    report["Network"].update(State="created", Subnet="10.32.0.0/12")
    text = format_status(report)
    assert "Service: plugin" in text
    assert "weavemesh (local, network+ipam), weave (global, network)" in text
    assert "/nonexistent/weavemesh.sock, /nonexistent/weave.sock" in text
    assert "DefaultNetwork: weave (10.32.0.0/12)" in text
    assert "Networks: 1 (nnnnnnnnnnnn)" in text
    assert report["Calls"]["NetworkDriver.CreateNetwork"]["Count"] == 1
