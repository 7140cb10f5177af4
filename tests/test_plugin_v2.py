"""The managed (V2) plugin under the machine's real dockerd and a real (single-node) swarm.

What a user does: `weavenet plugin build`, enable, `docker swarm init` (only if the daemon is not
in a swarm already; left again only if we joined it), `docker network create -d NAME:TAG
--attachable`, a 2-replica service and an attachable container that ping each other, then
`docker plugin set` of each setting, a bad IPALLOC_RANGE, disable/enable, a killed plugin that
Docker restarts, and `docker plugin rm` leaving nothing behind but the state directory.

Docker counts the plugin's users (+1 for each local copy of a network of it, -1 when the copy is
deleted) and drops a release that arrives while the plugin is disabled, for good (see
weavenet.plugin.v2.lifecycle). In swarm mode the node deletes its copy after `docker network rm`
has returned, so nothing here disables the plugin until Docker has logged the copy's destroy
event (remove_everything, after every test); only the next to last test leaks a reference, on
purpose, to show what `weavenet plugin remove` does about it. Those events come from one `docker
events` stream started before the module's first network (NetworkEvents).

Only one router can own the `weave` bridge, the TAP and ports 6783/6784 in the host's network
namespace, and the plugin's router is such a router. So the module holds an flock on
tests.plugin_helpers.ROOT_NAMESPACE_LOCK and first waits until no other weavenet router runs in this
namespace (the legacy plugin tests start theirs here). The plugin is always `wntv2/net-plugin:test`
(see PLUGIN_NAME), with its state in a directory of the run's own (`state.source`); everything
else it makes is named `wnt<hex>…`. All is removed in the fixtures' finally blocks, in the order
Docker needs: services (and their tasks), containers, networks, the swarm if we joined it (while
the plugin still answers), the plugin, the image. A swarm we init is marked in SWARM_MARKER until
we have left it, so a run that died in it is left by the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.plugin_helpers import (
    BUSYBOX,
    PREFIX,
    ROOT_NAMESPACE_LOCK,
    NetworkEvents,
    docker,
    import_busybox,
    wait_for,
    weavenet_chains,
    weavenet_routers,
)
from tests.prereq import missing
from weavenet.plugin.v2.build import DaemonLog
from weavenet.plugin.v2.config_json import SETTINGS
from weavenet.plugin.v2.lifecycle import STALE_REASON

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

WEAVENET = str(Path(sys.executable).with_name("weavenet"))
LOCK = ROOT_NAMESPACE_LOCK  # one lock for every test that runs a router in this namespace
WAIT_FOR_OTHERS = 600.0  # seconds to wait for another router in this namespace to go away
SWARM_MARKER = Path("/run/weavenet-test/swarm-joined")  # we made the daemon's swarm and have not left it
# One name for every run (runs are serialised by LOCK): Docker never unregisters a removed managed
# plugin's driver, and each one left registered makes every later `swarm leave` wait 15 s on it.
PLUGIN_NAME = "wntv2/net-plugin:test"


# --- the host ---


def port_free(port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def our_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n in ("weave", "weave-dp") or n.startswith(("vethwl", "vethwg", "vxlan-"))]


def sweep_dead_endpoints() -> list[str]:
    """Veth pairs of ours with both ends in this namespace, while no router runs: no container
    owns them (a live endpoint's other end is in a container), so they are a dead run's."""
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
    swept = []
    for line in out.splitlines():
        name, _, peer = line.split(":")[1].strip().partition("@")
        if name.startswith("vethwl") and peer.startswith("vethwg"):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            swept.append(name)
    return swept


@pytest.fixture(scope="module")
def host() -> Iterator[None]:
    """This namespace to ourselves: the lock, then no other router, no leftovers of one."""
    if os.geteuid() != 0:
        missing("root (the plugin changes the host's network)")
    if not BUSYBOX.exists():
        missing("/bin/busybox (Debian package busybox-static)")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + WAIT_FOR_OTHERS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                others = weavenet_routers()
                busy = [p for p in (6783, 6784) if not port_free(p)]
                if not others and not busy and not link_exists("weave-dp"):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                others, busy = ["another test holds " + str(LOCK)], []
            if time.monotonic() > deadline:
                missing(f"this network namespace free of other weavenet routers: {others or busy}")
            time.sleep(2)
        if swept := sweep_dead_endpoints():
            print(f"\nswept endpoints of dead runs: {', '.join(swept)}")
        leave_a_dead_runs_swarm()
        yield
    finally:
        os.close(fd)


# --- the plugin ---


@dataclass
class Plugin:
    name: str
    tag: str
    build_seconds: float
    enable_seconds: float
    events: NetworkEvents  # the daemon's network events since before the module's first network
    state_dir: Path  # the plugin's `state` mount: this run's own, never the machine's /var/lib/weavenet
    log: DaemonLog = field(default_factory=DaemonLog.find)

    def installed(self) -> bool:
        return docker("plugin", "inspect", self.name, check=False).returncode == 0

    @property
    def ident(self) -> str:
        return docker("plugin", "inspect", "-f", "{{.Id}}", self.name).stdout.strip()

    def enabled(self) -> bool:
        return docker("plugin", "inspect", "-f", "{{.Enabled}}", self.name).stdout.strip() == "true"

    def disable(self) -> float:
        began = time.monotonic()
        docker("plugin", "disable", "-f", self.name)
        return time.monotonic() - began

    def enable(self) -> float:
        began = time.monotonic()
        result = weavenet("plugin", "enable", "--name", self.name, check=False, timeout=90)
        assert result.returncode == 0, f"enable failed: {result.stderr}\n{self.log_tail()}"
        wait_for(api_answers, timeout=15, what="the plugin's router API on 127.0.0.1:6784")
        return time.monotonic() - began

    def set(self, **values: str) -> None:
        docker("plugin", "set", self.name, *(f"{k}={v}" for k, v in values.items()))

    def reconfigure(self, **values: str) -> None:
        self.disable()
        self.set(**values)
        self.enable()

    def log_tail(self, mark: int | float = 0) -> str:
        return "\n".join(self.log.plugin_lines(self.ident, mark)[-40:])

    def pid(self) -> int | None:
        """The plugin's PID 1, as the host sees it (its rootfs carries our build record)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"weavenet-plugin" not in (entry / "cmdline").read_bytes():
                    continue
                record = json.loads((entry / "root/etc/weavenet-plugin.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("name") == self.name:
                return int(entry.name)
        return None


def weavenet(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WEAVE_HTTP_ADDR", "EXTRA_ARGS", "WEAVE_PASSWORD")}
    result = subprocess.run([WEAVENET, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"weavenet {' '.join(args)}: {result.stderr.strip()}"
    return result


def api_answers() -> bool:
    return weavenet("status", check=False, timeout=10).returncode == 0


def report() -> dict[str, Any]:
    return json.loads(weavenet("report").stdout)


@pytest.fixture(scope="module")
def tag() -> str:
    return f"{PREFIX}{secrets.token_hex(3)}"


@pytest.fixture(scope="module")
def events(host: None, tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkEvents]:
    """The machine's dockerd's network events, from before the plugin (and any network of it) exists."""
    stream = NetworkEvents(tmp_path_factory.mktemp("docker-events") / "network-events.log", f"{tag}-probe")
    stream.start()
    try:
        yield stream
    finally:
        stream.close()


@pytest.fixture(scope="module")
def plugin(host: None, tag: str, events: NetworkEvents, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    name = PLUGIN_NAME
    if docker("plugin", "inspect", name, check=False).returncode == 0:  # a dead run's (we hold the lock)
        docker("plugin", "disable", "-f", name, check=False)
        docker("plugin", "rm", "-f", name)
    state_dir = tmp_path_factory.mktemp("plugin-state")
    state_dir.chmod(0o700)
    began = time.monotonic()
    built = weavenet("plugin", "build", "--name", name, timeout=300)
    build_seconds = time.monotonic() - began
    print(f"\n{built.stdout.strip()} (command: {build_seconds:.1f}s)")
    the_plugin = Plugin(name, tag, build_seconds, 0.0, events, state_dir)
    try:
        docker("plugin", "set", name, f"state.source={state_dir}")  # disabled, never enabled yet
        the_plugin.enable_seconds = the_plugin.enable()
        print(f"plugin enabled in {the_plugin.enable_seconds:.1f}s")
        yield the_plugin
    finally:
        try:
            remove_everything(the_plugin)
        finally:
            docker("plugin", "disable", "-f", name, check=False)
            docker("plugin", "rm", "-f", name, check=False)
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def nothing_left_behind(plugin: Plugin) -> Iterator[None]:
    """What a test made goes when it ends, passed or failed, so the next one starts clean."""
    try:
        yield
    finally:
        if plugin.installed() and not plugin.enabled():
            plugin.enable()  # Docker drops for good a release it gets while the plugin is disabled
        remove_everything(plugin)


@pytest.fixture(scope="module")
def image(host: None) -> Iterator[str]:
    name = f"wnt{secrets.token_hex(3)}-busybox"
    import_busybox(name)
    try:
        yield name
    finally:
        docker("rmi", "-f", name, check=False)


def swarm_state() -> str:
    return docker("info", "-f", "{{.Swarm.LocalNodeState}}").stdout.strip()


def leave_swarm(gwbridge_before: bool) -> None:
    """Leave the swarm we made, and be sure of it: a daemon left a swarm manager makes the next run take
    that swarm for the daemon's own (never left) and breaks test_plugin_docker.py's expectations."""
    began = time.monotonic()
    if swarm_state() != "inactive":
        docker("swarm", "leave", "--force", timeout=600)
    wait_for(
        lambda: swarm_state() == "inactive",
        timeout=60,
        interval=0.5,
        what=lambda: f"the daemon to be out of the swarm (its state: {swarm_state()!r})",
    )
    SWARM_MARKER.unlink(missing_ok=True)
    print(f"\nswarm left in {time.monotonic() - began:.1f}s")
    if not gwbridge_before:
        gwbridge = docker("network", "inspect", "-f", "{{len .Containers}}", "docker_gwbridge", check=False)
        if gwbridge.returncode == 0 and gwbridge.stdout.strip() == "0":
            docker("network", "rm", "docker_gwbridge")


def leave_a_dead_runs_swarm() -> None:
    """A run of ours that died in the swarm it made: its services, containers and networks go, then
    the swarm (its plugin, if still there, goes in the plugin fixture)."""
    if not SWARM_MARKER.exists():
        return
    gwbridge_before = bool(json.loads(SWARM_MARKER.read_text() or "{}").get("gwbridge_before", True))
    if swarm_state() != "inactive":
        remove_leftovers(PREFIX, PLUGIN_NAME)
    leave_swarm(gwbridge_before)


@dataclass
class Swarm:
    """The daemon's swarm, or one we made (and so must leave again)."""

    joined: bool
    gwbridge_before: bool

    def leave(self, plugin: Plugin) -> None:
        """Leave if we joined: before the plugin goes, because Docker keeps a removed managed
        plugin's driver registered and makes every later swarm leave wait 15 s on it."""
        remove_everything(plugin)
        if self.joined:
            leave_swarm(self.gwbridge_before)
            self.joined = False


@pytest.fixture(scope="module")
def swarm(plugin: Plugin) -> Iterator[Swarm]:
    """A swarm: the daemon's own, or one we make (after the plugin is enabled: G11) and leave again."""
    state = swarm_state()
    the_swarm = Swarm(
        joined=state == "inactive",
        gwbridge_before=docker("network", "inspect", "docker_gwbridge", check=False).returncode == 0,
    )
    if not the_swarm.joined and state != "active":
        missing(f"a usable swarm (this daemon's swarm state is {state!r})")
    try:
        if the_swarm.joined:
            # marked first: a run killed during the init still leaves the swarm to the next run
            SWARM_MARKER.parent.mkdir(parents=True, exist_ok=True)
            SWARM_MARKER.write_text(json.dumps({"gwbridge_before": the_swarm.gwbridge_before}))
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        engine_plugins = ("node", "inspect", "self", "-f", "{{json .Description.Engine.Plugins}}")
        wait_for(
            lambda: plugin.name in docker(*engine_plugins).stdout,
            timeout=60,
            interval=1,
            what="the swarm to see the plugin on this node",
        )
        yield the_swarm
    finally:
        the_swarm.leave(plugin)


def lines(*args: str) -> list[str]:
    """A docker listing that may fail (e.g. `service ls` outside a swarm): then nothing."""
    return [line for line in docker(*args, check=False).stdout.splitlines() if line.strip()]


def remove_everything(plugin: Plugin) -> None:
    """What the module made (remove_leftovers), and then Docker's local copies of its networks: only
    once those are destroyed may the plugin be disabled (module docstring)."""
    remove_leftovers(plugin.tag)
    plugin.events.sync()  # every create is in the file: none of them can pass for destroyed
    wait_for(
        lambda: not local_copies(plugin),
        timeout=90,  # a copy Docker deletes while the plugin is disabled waits ~15 s per dead-driver call
        interval=0.5,
        what=lambda: f"Docker to destroy its local copies of our networks (left: {local_copies(plugin)})",
    )


def remove_leftovers(tag: str, driver: str | None = None) -> None:
    """Services named <tag>… (waiting for their tasks to go), containers named <tag>…, networks named
    <tag>…; given a driver, only its networks and the containers on them. Fails with what is left."""
    services = [s for s in lines("service", "ls", "--format", "{{.Name}}") if s.startswith(tag)]
    if services:
        docker("service", "rm", *services)
    wait_for(
        lambda: not task_containers(tag),
        timeout=60,
        interval=0.5,
        what=lambda: f"the tasks of services {tag}… to go; left: {task_containers(tag)}",
    )
    networks = [
        name
        for name, net_driver in (line.split() for line in lines("network", "ls", "--format", "{{.Name}} {{.Driver}}"))
        if name.startswith(tag) and driver in (None, net_driver)
    ]

    def containers() -> list[str]:
        if driver is None:
            return lines("ps", "-aq", "--filter", f"name=^/{tag}")
        return sorted({c for net in networks for c in lines("ps", "-aq", "--filter", f"network={net}")})

    def remove_containers() -> bool:
        if left := containers():
            docker("rm", "-f", *left, check=False, timeout=120)  # a disabled plugin's Leave takes 15 s
        return not containers()

    wait_for(remove_containers, timeout=120, interval=1, what=lambda: f"containers {tag}… to go; left: {containers()}")
    for net in networks:
        wait_for(
            lambda net=net: (
                docker("network", "rm", net, check=False).returncode == 0
                or docker("network", "inspect", net, check=False).returncode != 0
            ),
            timeout=30,
            interval=1,
            what=f"network {net} to be removable",
        )


def local_copies(plugin: Plugin) -> list[str]:
    """Networks of the plugin this daemon made a local copy of and has not yet destroyed."""
    return plugin.events.local_copies(plugin.name)


def task_containers(tag: str) -> list[str]:
    return [
        line.split()[0]
        for line in lines("ps", "-a", "--format", '{{.ID}} {{.Label "com.docker.swarm.service.name"}}')
        if len(line.split()) > 1 and line.split()[1].startswith(tag)
    ]


# --- what a user does on a weave network ---


def create_network(plugin: Plugin, suffix: str, *opts: str) -> str:
    name = f"{plugin.tag}-{suffix}"
    docker("network", "create", "-d", plugin.name, "--attachable", *opts, name)
    return name


def start_service(plugin: Plugin, image: str, suffix: str, *networks: str, replicas: int = 2) -> list[str]:
    """A service of sleeping tasks on the networks; returns its task containers once all run."""
    name = f"{plugin.tag}-{suffix}"
    net_args = [a for n in networks for a in ("--network", n)]
    docker(
        "service", "create", "--detach", "--no-resolve-image", "--stop-grace-period", "1s", "--init",
        "--name", name, "--replicas", str(replicas), *net_args, image, "sleep", "600",
    )  # fmt: skip
    wait_for(
        lambda: (
            docker("service", "ls", "-f", f"name={name}", "--format", "{{.Replicas}}").stdout.strip()
            == f"{replicas}/{replicas}"
        ),
        timeout=90,
        interval=0.5,
        what=lambda: (
            f"service {name} to run {replicas}/{replicas} "
            + docker("service", "ps", "--no-trunc", name, check=False).stdout[-600:]
        ),
    )
    tasks = wait_for(
        lambda: (found := [c for c in task_containers(name) if running(c)]) and len(found) == replicas and found,
        timeout=30,
        what=f"{replicas} running task containers of {name}",
    )
    return list(tasks)


def running(container: str) -> bool:
    return docker("inspect", "-f", "{{.State.Running}}", container, check=False).stdout.strip() == "true"


def run_attached(plugin: Plugin, image: str, suffix: str, network: str) -> str:
    name = f"{plugin.tag}-{suffix}"
    docker("run", "-d", "--init", "--name", name, "--network", network, image, "sleep", "600")
    return name


def address(container: str, network: str) -> str:
    networks = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout)
    return str(networks[network]["IPAddress"])


def reaches(container: str, ip: str, timeout: float = 30) -> None:
    """Wait until `container` pings `ip`: a new container's (or a restarted router's) path settles after
    Docker has returned (ARP, the bridge's ports, the mesh's routes). Fails naming both."""
    wait_for(
        lambda: docker("exec", container, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0,
        timeout=timeout,
        interval=0.5,
        what=lambda: f"{container} to ping {ip}; its routes:\n{routes(container)}",
    )


def routes(container: str) -> str:
    return docker("exec", container, "ip", "route").stdout


def multicast_device(container: str) -> str | None:
    for line in routes(container).splitlines():
        if line.startswith("224.0.0.0/4"):
            return line.split("dev")[1].split()[0]
    return None


def device_for(container: str, ip: str) -> str:
    out = docker("exec", container, "ip", "-o", "-4", "addr").stdout
    for line in out.splitlines():
        if f" {ip}/" in line:
            return line.split()[1]
    raise AssertionError(f"{container} has no interface with {ip}:\n{out}")


# --- the scenarios ---


def test_build_is_quick_and_the_hosts_cli_reaches_the_plugins_router(plugin: Plugin) -> None:
    assert plugin.build_seconds < 60, f"building took {plugin.build_seconds:.1f}s"
    assert plugin.enable_seconds < 15, f"enabling took {plugin.enable_seconds:.1f}s"
    status = weavenet("status").stdout
    assert f"Drivers: {plugin.name} (global, network)" in status
    assert "Sockets: /run/docker/plugins/weave.sock" in status
    v2 = report()["Plugin"]["V2"]
    assert v2["Name"] == plugin.name
    assert docker("plugin", "inspect", "-f", "{{.Config.Interface.Socket}}", plugin.name).stdout.strip() == "weave.sock"
    assert link_exists("weave") and link_exists("weave-dp")


def test_a_swarm_service_and_an_attachable_container_ping_each_other(plugin: Plugin, swarm: Swarm, image: str) -> None:
    net = create_network(plugin, "net")
    mnet = create_network(plugin, "mnet", "--opt", "works.weave.multicast")
    tasks = start_service(plugin, image, "svc", net, mnet)
    ips = [address(t, net) for t in tasks]
    reaches(tasks[0], ips[1])
    reaches(tasks[1], ips[0])
    client = run_attached(plugin, image, "client", net)
    reaches(client, ips[0])
    reaches(tasks[1], address(client, net))
    # works.weave.multicast is honoured per network: the route goes to the multicast network only
    assert multicast_device(tasks[0]) == device_for(tasks[0], address(tasks[0], mnet))
    assert multicast_device(client) is None
    # the host's CLI lists what the plugin's router serves
    ps = weavenet("ps").stdout
    for task, ip in zip(tasks, ips, strict=True):
        assert any(line.startswith(task[:12]) and f"{ip}/" in line for line in ps.splitlines()), ps
    assert wait_for(lambda: report()["Plugin"]["V2"]["Swarm"]["State"] == "active", timeout=30, what="swarm seen")


def test_disable_enable_and_a_killed_plugin_keep_the_network_usable(plugin: Plugin, swarm: Swarm, image: str) -> None:
    net = create_network(plugin, "keep")
    tasks = start_service(plugin, image, "keep", net)
    ips = [address(t, net) for t in tasks]
    reaches(tasks[0], ips[1])

    stopped_in = plugin.disable()  # -f: the network is in use
    assert stopped_in < 5, f"disable took {stopped_in:.1f}s: SIGTERM not handled promptly"
    assert link_exists("weave"), "the bridge must stay while containers use it"
    plugin.enable()
    reaches(tasks[0], ips[1])
    reaches(tasks[1], ips[0])
    after_enable = run_attached(plugin, image, "after-enable", net)
    reaches(after_enable, ips[0])

    old_pid = plugin.pid()
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)  # Docker restarts an enabled plugin that dies
    wait_for(lambda: (pid := plugin.pid()) is not None and pid != old_pid, timeout=30, what="Docker to restart it")
    wait_for(api_answers, timeout=30, what="the restarted router's API")
    assert plugin.enabled()
    reaches(tasks[1], ips[0])
    after_restart = run_attached(plugin, image, "after-restart", net)
    reaches(after_restart, ips[1])
    # every start asks the swarm again
    assert wait_for(lambda: report()["Plugin"]["V2"]["Swarm"]["State"] == "active", timeout=30, what="swarm seen")


def test_every_setting_takes_effect(plugin: Plugin, swarm: Swarm, image: str) -> None:
    nickname = f"{plugin.tag}-node"
    mark = plugin.log.mark()
    plugin.reconfigure(
        WEAVE_PASSWORD="wnt-secret",
        WEAVE_MTU="1400",
        WEAVE_MULTICAST="true",
        IPALLOC_RANGE="10.44.0.0/16",
        LOG_LEVEL="debug",
        EXTRA_ARGS=f"--nickname {nickname}",
        WEAVE_PEERS="198.51.100.7",
    )
    try:
        status = weavenet("status").stdout
        assert re.search(r"Encryption: enabled", status), status
        assert f"({nickname})" in status
        assert "Range: 10.44.0.0/16" in status
        targets = weavenet("status", "targets").stdout
        assert "198.51.100.7" in targets
        mtu = Path("/sys/class/net/weave/mtu").read_text().strip()
        assert mtu == "1400"
        assert report()["Plugin"]["V2"]["MulticastDefault"] is True
        wait_for(  # dockerd writes the plugin's output as it comes
            lambda: any(" DEBUG " in line for line in plugin.log.plugin_lines(plugin.ident, mark)),
            timeout=30,
            what="a DEBUG line of the plugin in dockerd's log (LOG_LEVEL=debug)",
        )
        # WEAVE_MULTICAST is the default; a network's own option still wins
        default_on = create_network(plugin, "mc-default")
        off = create_network(plugin, "mc-off", "--opt", "works.weave.multicast=false")
        on_default = run_attached(plugin, image, "mc-a", default_on)
        assert multicast_device(on_default) is not None
        on_off = run_attached(plugin, image, "mc-b", off)
        assert multicast_device(on_off) is None
    finally:
        remove_everything(plugin)
        plugin.reconfigure(**{setting.name: setting.default for setting in SETTINGS})
    assert "Encryption: disabled" in weavenet("status").stdout


def host_route() -> str:
    """A prefix the host routes (not through weave): an IPALLOC_RANGE that must be refused.
    The kernel's route for the default interface's own subnet: it does not come and go."""
    lines = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout.splitlines()
    default_dev = next((line.split("dev")[1].split()[0] for line in lines if line.startswith("default")), None)
    kernel = [line.split() for line in lines if "proto kernel" in line and "dev" in line and "weave" not in line]
    for words in kernel:
        if words[words.index("dev") + 1] == default_dev:
            return words[0]
    if kernel:
        return kernel[0][0]
    pytest.skip("the host has no prefix route to collide with")


def test_a_bad_ipalloc_range_fails_enable_and_says_why(plugin: Plugin) -> None:
    bad = host_route()
    plugin.disable()
    plugin.set(IPALLOC_RANGE=bad)
    mark = plugin.log.mark()
    try:
        began = time.monotonic()
        result = weavenet("plugin", "enable", "--name", plugin.name, check=False, timeout=90)
        took = time.monotonic() - began
        print(f"\nenable with IPALLOC_RANGE={bad} failed after {took:.1f}s: {result.stderr.strip()}")
        assert result.returncode == 1
        assert "overlaps the host route" in result.stderr and "IPALLOC_RANGE" in result.stderr
        assert took < 20, f"enable took {took:.1f}s to fail"  # Docker's own wait for the socket: ~12.5 s
        assert not plugin.enabled()
        reasons = wait_for(
            lambda: [line for line in plugin.log.plugin_lines(plugin.ident, mark) if "overlaps the host route" in line],
            timeout=30,
            what="the plugin's reason in dockerd's log",
        )
        assert reasons[0].startswith("weavenet plugin: cannot start: --ipalloc-range (from $IPALLOC_RANGE)")
        # `weavenet plugin install` checks the same before it builds anything: it fails at once
        began = time.monotonic()
        other = f"{plugin.tag}/other:test"  # never created: refused before the build
        refused = weavenet("plugin", "install", "--name", other, f"IPALLOC_RANGE={bad}", check=False)
        assert refused.returncode == 1 and "overlaps the host route" in refused.stderr
        assert time.monotonic() - began < 10
        assert docker("plugin", "inspect", other, check=False).returncode != 0
    finally:
        plugin.set(IPALLOC_RANGE="10.32.0.0/12")
        plugin.enable()


def test_disabling_waits_for_docker_and_a_reference_docker_leaked_is_forced_with_the_reason(
    plugin: Plugin, swarm: Swarm, image: str
) -> None:
    """`weavenet plugin disable` right after the networks went needs no -f: this module never lets Docker
    drop a release. Then the leak a user can cause (a swarm network's local copy deleted while the plugin
    is disabled): Docker says "in use" for good, and `weavenet plugin disable` says why and forces."""
    net = create_network(plugin, "quick")
    client = run_attached(plugin, image, "quick", net)
    docker("rm", "-f", client)
    docker("network", "rm", net)  # returns before Docker deletes its local copy: the command waits for that
    quick = weavenet("plugin", "disable", "--name", plugin.name)
    assert quick.stdout.strip() == f"plugin {plugin.name} disabled", quick.stdout
    plugin.events.sync()
    assert not local_copies(plugin), "disabled before Docker had destroyed its copy"
    plugin.enable()

    leaky = create_network(plugin, "leak")
    client = run_attached(plugin, image, "leak", leaky)
    mark = plugin.log.mark()
    plugin.disable()  # -f: the network is in use
    began = time.monotonic()
    docker("rm", "-f", client, timeout=120)  # Docker tries the disabled plugin's Leave, DeleteEndpoint ~15 s each
    wait_for(lambda: not local_copies(plugin), timeout=120, interval=0.5, what="Docker to destroy the leak's copy")
    print(f"\nDocker deleted the network's copy with the plugin disabled in {time.monotonic() - began:.1f}s")
    if plugin.log.path is not None:  # the daemon's log says it dropped the release
        refcount_error = "Error handling plugin refcount operation"
        dropped = wait_for(
            lambda: [line for line in plugin.log.lines_since(mark) if refcount_error in line],
            timeout=30,
            what="dockerd to log the release it dropped",
        )
        assert "found but disabled" in dropped[0], f"Docker logged another refcount error: {dropped[0]}"
    plugin.enable()
    docker("network", "rm", leaky)
    assert not lines("network", "ls", "--filter", f"driver={plugin.name}", "--format", "{{.Name}}")
    refused = docker("plugin", "disable", plugin.name, check=False)
    assert refused.returncode != 0 and "in use" in refused.stderr, "Docker's count was expected to be stale"
    forced = weavenet("plugin", "disable", "--name", plugin.name)
    assert STALE_REASON in forced.stdout and "disabling with --force" in forced.stdout, forced.stdout
    assert not plugin.enabled()
    plugin.enable()


def test_removing_the_plugin_leaves_only_the_state_directory(plugin: Plugin, swarm: Swarm) -> None:
    """Last: the module's plugin goes, the way a user removes it: networks and services gone, the swarm
    left, `weavenet plugin remove`. If the test before ran, Docker still counts the reference it leaked on
    purpose, and the command says so and forces; the router tidies the host either way."""
    swarm.leave(plugin)
    assert plugin.enabled()
    removed = weavenet("plugin", "remove", "--name", plugin.name)
    print(f"\n{removed.stdout.strip()}")
    assert removed.stdout.strip().endswith(f"plugin {plugin.name} removed (its state directory stays)")
    assert docker("plugin", "inspect", plugin.name, check=False).returncode != 0
    assert our_links() == [], "bridge, TAP or veths left behind"
    assert weavenet_chains() == [], "iptables chains left behind"
    assert (plugin.state_dir / "weavenet.db").exists(), "the persisted state must stay, in the state.source set"
    assert port_free(6783) and port_free(6784)
