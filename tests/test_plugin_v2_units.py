"""The managed (V2) plugin's pieces that need no Docker: manifest, settings, swarm peers, multicast.

These read as what a user configures and what the router then does; the end-to-end behaviour
under a real daemon and swarm is in test_plugin_v2.py.
"""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio

from weavenet.config import ConfigError
from weavenet.plugin.docker_api import DockerError
from weavenet.plugin.state import NetworkTable
from weavenet.plugin.v2 import build, config_json, entrypoint
from weavenet.plugin.v2.service import V2NetworkDriver, explicit_multicast
from weavenet.plugin.v2.swarm import STORE_KEY, SwarmPeers, forget_dropped_setting_peers, host_of, read_swarm

# --- config.json ---


def test_manifest_is_a_network_driver_with_host_networking_and_few_capabilities() -> None:
    config = config_json.plugin_config("wnt/net-plugin:t1")
    assert config["interface"] == {"socket": "weave.sock", "types": ["docker.networkdriver/1.0"]}
    assert config["network"] == {"type": "host"}
    assert config["linux"]["capabilities"] == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    assert [d["path"] for d in config["linux"]["devices"]] == ["/dev/net/tun"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert mounts["/var/lib/weavenet"]["source"] == "/var/lib/weavenet"
    assert mounts["/var/run/docker.sock"]["type"] == "bind"
    settable = {e["name"]: e["value"] for e in config["env"] if e.get("settable") == ["value"]}
    for name in ("WEAVE_PASSWORD", "WEAVE_MTU", "WEAVE_MULTICAST", "IPALLOC_RANGE", "EXTRA_ARGS", "LOG_LEVEL"):
        assert name in settable
    assert settable["IPALLOC_RANGE"] == "10.32.0.0/12"
    fixed = {e["name"]: e["value"] for e in config["env"] if "settable" not in e}
    assert fixed == {"WEAVE_PLUGIN_REF": "wnt/net-plugin:t1"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [("weavenet/net-plugin", "weavenet/net-plugin:latest"), ("wnt1:v2", "wnt1:v2"), ("a/b/c:1.0", "a/b/c:1.0")],
)
def test_plugin_names_get_a_tag(given: str, expected: str) -> None:
    assert build.normalise_name(given) == expected


@pytest.mark.parametrize("bad", ["Upper/case:x", "", "a b:c", "net:"])
def test_bad_plugin_names_are_refused(bad: str) -> None:
    with pytest.raises(build.BuildError, match="--name"):
        build.normalise_name(bad)


def test_only_declared_settings_can_be_set() -> None:
    assert build.check_settings(["WEAVE_MTU=1400", "EXTRA_ARGS=--log-level debug"]) == [
        "WEAVE_MTU=1400",
        "EXTRA_ARGS=--log-level debug",
    ]
    with pytest.raises(build.BuildError, match="KEY=VALUE"):
        build.check_settings(["HOST_ROOT=/x"])


@pytest.mark.parametrize("bad", ["-1", "soon", "7200"])
def test_plugin_disable_and_remove_refuse_a_bad_wait_in_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from weavenet.cli import main

    for action in ("disable", "remove"):
        with pytest.raises(SystemExit) as exited:
            main(["plugin", action, f"--wait={bad}"])
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"weavenet plugin {action}: argument --wait: '{bad}'") and "\n" not in err


# --- the plugin's environment → settings ---


def plugin_env(**overrides: str) -> dict[str, str]:
    """What Docker passes: every declared variable, empty ones included."""
    env = {s.name: s.default for s in config_json.SETTINGS}
    env["WEAVE_PLUGIN_REF"] = "wnt/net-plugin:t1"
    env.update(overrides)
    return env


def test_defaults_give_a_v2_router_without_the_legacy_plugin() -> None:
    plan = entrypoint.plan_from(plugin_env())
    s = plan.settings
    assert plan.ref == "wnt/net-plugin:t1" and plan.multicast_default is False
    assert s.foreground and not s.plugin
    assert (s.plugin_mesh_name, s.plugin_name, s.plugin_network) == ("", "", "")
    assert s.state_dir == Path("/var/lib/weavenet") and s.docker_api == "/var/run/docker.sock"
    assert s.ipalloc_range == IPv4Network("10.32.0.0/12")
    assert s.password is None and s.mtu is None and s.log_level == "info"


def test_every_setting_takes_effect() -> None:
    plan = entrypoint.plan_from(
        plugin_env(
            WEAVE_PASSWORD="s3cret",
            WEAVE_MTU="1400",
            WEAVE_MULTICAST="true",
            IPALLOC_RANGE="10.44.0.0/16",
            LOG_LEVEL="debug",
            EXTRA_ARGS="--nickname 'node one' --trusted-subnets=192.0.2.0/24 198.51.100.7",
            WEAVE_PEERS="198.51.100.8,198.51.100.9",
        )
    )
    s = plan.settings
    assert s.encrypted and s.mtu == 1400 and plan.multicast_default
    assert s.ipalloc_range == IPv4Network("10.44.0.0/16") and s.log_level == "debug"
    assert s.nickname == "node one" and s.trusted_subnets == (IPv4Network("192.0.2.0/24"),)
    assert [p.host for p in s.peers] == ["198.51.100.7", "198.51.100.8", "198.51.100.9"]


def test_empty_ipalloc_range_disables_ipam() -> None:
    assert entrypoint.plan_from(plugin_env(IPALLOC_RANGE="")).settings.ipalloc_range is None


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"IPALLOC_RANGE": "10.32.0.1/12"}, ("--ipalloc-range", "$IPALLOC_RANGE", "host bits")),
        ({"WEAVE_MTU": "9"}, ("--mtu", "$WEAVE_MTU")),
        ({"WEAVE_MULTICAST": "yes please"}, ("WEAVE_MULTICAST", "boolean")),
        ({"LOG_LEVEL": "chatty"}, ("--log-level", "$LOG_LEVEL")),
        ({"EXTRA_ARGS": "--bogus"}, ("EXTRA_ARGS", "--bogus")),
        ({"EXTRA_ARGS": "--nickname 'unclosed"}, ("EXTRA_ARGS", "quotation")),
    ],
)
def test_bad_settings_are_one_line_naming_the_setting(overrides: dict[str, str], names: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        entrypoint.plan_from(plugin_env(**overrides))
    message = str(caught.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_a_bad_setting_is_said_in_one_line_and_the_entry_point_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert entrypoint.main(plugin_env(WEAVE_MTU="huge")) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("weavenet plugin: cannot start: --mtu (from $WEAVE_MTU)")
    assert "docker plugin set wnt/net-plugin:t1" in err


def test_a_range_overlapping_a_host_route_names_ipalloc_range(monkeypatch: pytest.MonkeyPatch) -> None:
    from weavenet.ipam import hostcheck

    monkeypatch.setattr(hostcheck, "host_routes", lambda ipr: [(IPv4Network("10.0.0.0/8"), "eth9")])
    plan = entrypoint.plan_from(plugin_env(IPALLOC_RANGE="10.44.0.0/16"))
    with pytest.raises(ConfigError, match=r"\(from \$IPALLOC_RANGE\): 10.44.0.0/16 overlaps the host route 10.0.0.0/8"):
        entrypoint.check_host(plan, plugin_env())


# --- multicast: per network, WEAVE_MULTICAST the default ---


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, None),
        ({"com.docker.network.generic": {}}, None),
        ({"com.docker.network.generic": {"works.weave.multicast": ""}}, True),
        ({"com.docker.network.generic": {"works.weave.multicast": "false"}}, False),
        ({"works.weave.multicast": "1"}, True),  # AllocateNetwork and `docker network inspect` are flat
    ],
)
def test_a_networks_own_multicast_option(options: dict[str, Any] | None, expected: bool | None) -> None:
    assert explicit_multicast(options) is expected


def create_network(driver: V2NetworkDriver, network_id: str, generic: dict[str, str]) -> bool:
    body = {
        "NetworkID": network_id,
        "Options": {"com.docker.network.generic": generic},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Gateway": "10.0.1.1/24", "Pool": "10.0.1.0/24"}],
    }
    trio.run(driver.create_network, body)
    record = driver.networks.get(network_id)
    assert record is not None
    return record.multicast


@pytest.mark.parametrize("default", [False, True])
def test_the_option_wins_and_weave_multicast_fills_in(default: bool) -> None:
    driver = V2NetworkDriver("wnt/net-plugin:t1", NetworkTable(None), docker=None, multicast_default=default)
    assert create_network(driver, "n-unset", {}) is default
    assert create_network(driver, "n-on", {"works.weave.multicast": "true"}) is True
    assert create_network(driver, "n-off", {"works.weave.multicast": "false"}) is False


def test_a_changed_weave_multicast_applies_to_existing_networks_after_a_restart(tmp_path: Path) -> None:
    from weavenet.store import Store

    def driver(default: bool) -> V2NetworkDriver:
        table = NetworkTable(Store(tmp_path))
        table.load()
        return V2NetworkDriver("wnt/net-plugin:t1", table, docker=None, multicast_default=default)

    first = driver(False)
    assert create_network(first, "n-unset", {}) is False
    assert create_network(first, "n-off", {"works.weave.multicast": "false"}) is False
    first.networks.store.close()  # type: ignore[union-attr]
    restarted = driver(True)  # docker plugin set WEAVE_MULTICAST=true; enable
    assert trio.run(restarted._network, "n-unset").multicast is True
    assert trio.run(restarted._network, "n-off").multicast is False


# --- swarm peers ---


class FakeDocker:
    def __init__(self) -> None:
        self.swarm: dict[str, Any] = {"LocalNodeState": "inactive"}
        self.nodes: list[dict[str, Any]] = []
        self.down = False

    async def info(self) -> dict[str, Any]:
        if self.down:
            raise DockerError("cannot talk to Docker at /var/run/docker.sock: connection refused")
        return {"Name": "host1", "Swarm": self.swarm}

    async def swarm_nodes(self) -> list[dict[str, Any]]:
        return self.nodes

    def join(self, node_id: str, managers: dict[str, str], *, manager: bool = False) -> None:
        self.swarm = {
            "LocalNodeState": "active",
            "NodeID": node_id,
            "ControlAvailable": manager,
            "RemoteManagers": [{"NodeID": n, "Addr": a} for n, a in managers.items()],
        }


class FakeRouter:
    def __init__(self) -> None:
        self.targets: set[str] = set()
        self.connects: list[list[str]] = []

    async def connect(self, peers: list[str], *, replace: bool = False) -> list[str]:
        self.connects.append(list(peers))
        self.targets |= set(peers)
        return []

    def forget(self, peers: list[str]) -> None:
        self.targets -= set(peers)


class DictStore(dict[str, Any]):
    def get_json(self, key: str, default: Any = None) -> Any:
        return self.get(key, default)

    def put_json(self, key: str, value: Any) -> None:
        self[key] = value


def test_address_hosts() -> None:
    assert host_of("10.0.0.5:2377") == "10.0.0.5"
    assert host_of("[fd00::5]:2377") == "fd00::5"
    assert host_of("10.0.0.6") == "10.0.0.6"


def test_a_worker_connects_to_the_managers_but_not_to_itself() -> None:
    docker, router, store = FakeDocker(), FakeRouter(), DictStore()
    docker.join("self", {"self": "192.0.2.1:2377", "m1": "192.0.2.10:2377", "m2": "[fd00::2]:2377"})
    peers = SwarmPeers(docker, router, store, port=6783)
    assert trio.run(peers.sync)
    assert router.targets == {"192.0.2.10:6783", "[fd00::2]:6783"}
    assert store[STORE_KEY] == sorted(router.targets)


def test_a_manager_connects_to_every_ready_node() -> None:
    docker, router = FakeDocker(), FakeRouter()
    docker.join("self", {"self": "192.0.2.1:2377"}, manager=True)
    docker.nodes = [
        {"ID": "self", "Status": {"State": "ready", "Addr": "192.0.2.1"}},
        {"ID": "w1", "Status": {"State": "ready", "Addr": "192.0.2.21"}},
        {"ID": "w2", "Status": {"State": "down", "Addr": "192.0.2.22"}},
        {"ID": "m2", "Status": {"State": "ready", "Addr": "0.0.0.0"}, "ManagerStatus": {"Addr": "192.0.2.2:2377"}},
    ]
    assert trio.run(SwarmPeers(docker, router, DictStore(), port=7000).sync)
    assert router.targets == {"192.0.2.21:7000", "192.0.2.2:7000"}


def test_node_changes_are_followed_and_only_our_targets_forgotten() -> None:
    docker, router, store = FakeDocker(), FakeRouter(), DictStore()
    router.targets.add("198.51.100.1:6783")  # the user's own `weavenet connect`
    peers = SwarmPeers(docker, router, store, port=6783)
    docker.join("self", {"m1": "192.0.2.10:2377"})
    trio.run(peers.sync)
    docker.join("self", {"m2": "192.0.2.11:2377"})  # m1 demoted or gone, m2 promoted
    trio.run(peers.sync)
    assert router.targets == {"198.51.100.1:6783", "192.0.2.11:6783"}
    docker.swarm = {"LocalNodeState": "inactive"}  # swarm leave
    trio.run(peers.sync)
    assert router.targets == {"198.51.100.1:6783"}
    assert store[STORE_KEY] == []


def test_every_start_asks_the_swarm_again_and_drops_stale_managers() -> None:
    """Weave Net's plugin asked only on its first start; a restart kept peers that had left."""
    docker, store = FakeDocker(), DictStore()
    docker.join("self", {"m1": "192.0.2.10:2377"})
    first = FakeRouter()
    trio.run(SwarmPeers(docker, first, store, port=6783).sync)
    # Restart: the router reloads its persisted targets; meanwhile m1 left and m3 joined.
    restarted = FakeRouter()
    restarted.targets = set(first.targets)
    docker.join("self", {"m3": "192.0.2.13:2377"})
    trio.run(SwarmPeers(docker, restarted, store, port=6783).sync)
    assert restarted.targets == {"192.0.2.13:6783"}
    # And again with nothing changed: still asks, and connects (persisted state is not trusted).
    again = FakeRouter()
    trio.run(SwarmPeers(docker, again, store, port=6783).sync)
    assert again.connects == [["192.0.2.13:6783"]]


class _Enough(Exception):
    pass


def test_docker_not_answering_is_retried_quietly() -> None:
    docker, router = FakeDocker(), FakeRouter()
    docker.down = True
    naps: list[float] = []

    async def scenario() -> None:
        async def nap(seconds: float) -> None:
            naps.append(seconds)
            if len(naps) == 3:
                docker.down = False
                docker.join("self", {"m1": "192.0.2.10:2377"})
            if len(naps) == 5:
                raise _Enough

        peers = SwarmPeers(docker, router, DictStore(), port=6783, sleep=nap)
        with pytest.raises(_Enough):
            await peers.run()

    trio.run(scenario)
    assert naps[:3] == [1.0, 2.0, 4.0]
    assert naps[3] == 10.0
    assert router.targets == {"192.0.2.10:6783"}


def test_peers_taken_out_of_the_settings_are_forgotten_at_the_next_start() -> None:
    router, store = FakeRouter(), DictStore()
    router.targets = {"198.51.100.7:6783", "198.51.100.8:6783", "203.0.113.1:6783"}  # the last: `connect`ed
    assert forget_dropped_setting_peers(router, store, ["198.51.100.7:6783", "198.51.100.8:6783"]) == []
    assert forget_dropped_setting_peers(router, store, ["198.51.100.8:6783"]) == ["198.51.100.7:6783"]
    assert router.targets == {"198.51.100.8:6783", "203.0.113.1:6783"}


def test_read_swarm_outside_a_swarm() -> None:
    view = trio.run(read_swarm, FakeDocker())
    assert view.state == "inactive" and view.addresses == frozenset()


# --- the Docker daemon's log ---


def test_the_plugins_reason_is_read_back_from_the_daemon_log(tmp_path: Path) -> None:
    log_file = tmp_path / "dockerd.log"
    log_file.write_text('time="t0" level=info msg="before" plugin=abc\n')
    log = build.DaemonLog(log_file)
    mark = log.mark()
    with log_file.open("a") as f:
        f.write('time="t1" level=info msg="Starting up"\n')
        f.write(
            'time="t2" level=error msg="weavenet plugin: cannot start: --ipalloc-range (from $IPALLOC_RANGE): '
            '10.0.0.0/8 overlaps the host route 10.1.0.0/16 dev \\"eth0\\"" plugin=abc\n'
        )
        f.write('time="t3" level=error msg="other" plugin=def\n')
    assert log.plugin_reason("abc", mark) == (
        'cannot start: --ipalloc-range (from $IPALLOC_RANGE): 10.0.0.0/8 overlaps the host route 10.1.0.0/16 dev "eth0"'
    )
    assert log.plugin_reason("def", mark) is None
