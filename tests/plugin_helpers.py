"""Helpers for the Docker plugin tests: a client for the plugin sockets, and the Docker harness.

`PluginClient` speaks Docker's plugin protocol to a socket as dockerd does (POST, JSON, keep-alive).
`DockerRouter` runs a real `weavenet launch --foreground` in the machine's own network namespace
(where dockerd is), its sockets in a fixed directory that Docker finds through spec files in
/etc/docker/plugins (`<name>.spec` → `unix://<socket>`), under fixed test driver and network names
(`wnt000000…`, see STABLE_TAG). Everything it makes is removed again in `close()`, in the order
Docker needs: containers, then networks (the plugin must still answer), then the router, then the
spec files, and last what the test run created on the host (docker_gwbridge, the weave bridge, our
iptables chains) if it did not exist before (an aborted run's counts as made: HostSnapshot).
`sweep_docker()` does the same for runs that died. `NetworkEvents` records a daemon's network events.
`RootLink` joins that router's namespace (the machine's own) to a lab host for cross-host tests.
Only one router may run in the machine's namespace at a time: `RootNamespaceLock` serialises them.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import Host
from weavenet.api.client import ApiClient, ApiUnreachable, UnixHTTPConnection
from weavenet.config import HttpAddress
from weavenet.net import firewall, vxlan

WEAVENET = str(Path(sys.executable).with_name("weavenet"))
SPEC_DIR = Path("/etc/docker/plugins")
PREFIX = "wnt"  # every Docker object and spec file a plugin test makes starts with this
# Docker never forgets a legacy driver name it has used (each costs `docker swarm leave` 15 s once
# its plugin is gone), and it caches a plugin's socket address with its name. So every test run
# uses the same driver names and the same socket directory: tests that run a router in the
# machine's namespace are serialised by ROOT_NAMESPACE_LOCK anyway.
STABLE_TAG = f"{PREFIX}000000"
STABLE_PLUGIN_DIR = Path("/run/weavenet-test/plugins")
BUSYBOX = Path("/bin/busybox")
DOCKER = shutil.which("docker") or "docker"
# A router in the machine's namespace owns the bridge `weave` and the TAP `weave-dp` there; a second
# one would take them over (it removes a `weave-dp` it did not make as stale). Every test that runs
# a router in that namespace (DockerRouter, the V2 plugin's tests) holds this lock meanwhile.
ROOT_NAMESPACE_LOCK = Path("/run/weavenet-lab/root-namespace.lock")


class RootNamespaceLock:
    """An exclusive flock on ROOT_NAMESPACE_LOCK; waits (up to `timeout`) for a parallel run."""

    def __init__(self, timeout: float = 1200.0) -> None:
        self.timeout = timeout
        self._file: Any = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        ROOT_NAMESPACE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        lock = open(ROOT_NAMESPACE_LOCK, "a")  # noqa: SIM115 (held until release)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise AssertionError(
                        f"another test has run a router in the machine's namespace for {self.timeout:g}s "
                        f"(lock {ROOT_NAMESPACE_LOCK})"
                    ) from None
                time.sleep(0.5)
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> RootNamespaceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class PluginReply:
    status: int
    text: str
    elapsed: float

    @property
    def json(self) -> Any:
        return json.loads(self.text)


class PluginClient:
    """POST /<Interface>.<Method> with a JSON body on one keep-alive connection (not thread-safe)."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    def post(self, method: str, body: Any = None, *, raw: bytes | None = None) -> PluginReply:
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        headers = {"Accept": "application/vnd.docker.plugins.v1.2+json", "Content-Length": str(len(payload))}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.path, self.timeout)
            began = time.monotonic()
            try:
                self._conn.request("POST", f"/{method}", body=payload, headers=headers)
                reply = self._conn.getresponse()
                text = reply.read().decode()
                return PluginReply(reply.status, text, time.monotonic() - began)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ok(self, method: str, body: Any = None) -> Any:
        reply = self.post(method, body)
        assert reply.status == 200, f"{method}: {reply.status} {reply.text}"
        return reply.json

    def err(self, method: str, body: Any = None) -> str:
        reply = self.post(method, body)
        assert reply.status == 500, f"{method}: expected an error, got {reply.status} {reply.text}"
        return str(reply.json["Err"])

    def answers(self) -> bool:
        """Is the socket served? Probed with a method nobody implements, so no call is counted."""
        try:
            return self.post("Plugin.Probe").status > 0
        except (OSError, http.client.HTTPException):
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class GiveUp(AssertionError):
    """Raised by a wait_for predicate when its condition can never hold (e.g. the process died)."""


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str | Callable[[], str], interval: float = 0.05
) -> Any:
    """Poll `predicate` until it returns something truthy (returned), checking once more at the deadline.

    An exception from the predicate counts as "not yet" (Docker and the kernel answer mid-change) and is
    reported with the timeout; GiveUp ends the wait at once. `what` may be a callable, evaluated only at
    the deadline, to describe the state then."""
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        final = time.monotonic() >= deadline
        try:
            value = predicate()
        except GiveUp:
            raise
        except Exception as exc:
            error = exc
        else:
            error = None
            if value:
                return value
        if final:
            break
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.001)))
    try:
        described = what() if callable(what) else what
    except Exception as exc:
        described = f"(describing the wait failed: {exc!r})"
    detail = f"; the last check raised {type(error).__name__}: {error}" if error is not None else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {described}{detail}") from error


# --- Docker ---


def docker(
    *args: str, check: bool = True, timeout: float = 60, cli: tuple[str, ...] = (DOCKER,)
) -> subprocess.CompletedProcess[str]:
    """`cli` is the docker command line (with -H for a daemon other than the machine's)."""
    result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def docker_lines(*args: str) -> list[str]:
    return [line for line in docker(*args).stdout.splitlines() if line.strip()]


class NetworkEvents:
    """A daemon's network events, streamed by `docker events` into a file from start() on.

    `docker events --since` only reaches back over the daemon's last 256 events, so a busy test
    can lose a `create` from it; a stream started before the first network misses none. Docker logs
    a network's `destroy` right after it drops the reference its local copy held on the driver.
    The stream runs behind the daemon; sync() waits until it has caught up with now."""

    def __init__(self, path: Path, probe: str, cli: tuple[str, ...] = (DOCKER,)) -> None:
        self.path = path
        self.probe = probe  # a throwaway bridge network's name, made and removed by sync()
        self.cli = cli  # the docker command line, with -H for a daemon other than the machine's
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NetworkEvents:
        """Start streaming; returns once the stream has caught up (before that, the CLI may not
        even have subscribed)."""
        argv = [*self.cli, "events", "--filter", "type=network", "--format", "{{json .}}"]
        with open(self.path, "wb") as out, open(self.path.with_suffix(".err"), "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            self.sync()
        except BaseException:
            self.close()
            raise
        return self

    def sync(self) -> None:
        """Make the probe network come and go, and wait for the stream to show it gone: every event
        the daemon logged before is in the file then (it sends them in order)."""

        def probes_gone() -> int:
            return sum(1 for e in self.events() if e.get("Action") == "destroy" and _actor(e).get("name") == self.probe)

        seen = probes_gone()
        try:
            docker("network", "create", "-d", "bridge", self.probe, cli=self.cli)
        finally:
            docker("network", "rm", self.probe, check=False, cli=self.cli)
        wait_for(
            lambda: probes_gone() > seen,
            timeout=30,
            what=f"`docker events` to show network {self.probe} destroyed",
        )

    def events(self) -> list[dict[str, Any]]:
        if self.process is None or self.process.poll() is not None:
            err = self.path.with_suffix(".err")
            raise GiveUp(f"`docker events` is not running: {err.read_text().strip() if err.exists() else ''}")
        text = self.path.read_text(errors="replace")
        complete = text[: text.rfind("\n") + 1]  # a line being written is read next time
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def local_copies(self, driver: str) -> list[str]:
        """Networks of `driver` the daemon created (its local copy) and has not destroyed since start()."""
        alive: dict[str, str] = {}
        for event in self.events():
            actor = event.get("Actor", {})
            if _actor(event).get("type") != driver:
                continue
            if event.get("Action") == "create":
                alive[actor["ID"]] = _actor(event).get("name", actor["ID"])
            elif event.get("Action") == "destroy":
                alive.pop(actor["ID"], None)
        return sorted(alive.values())

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _actor(event: dict[str, Any]) -> dict[str, str]:
    attributes: dict[str, str] = event.get("Actor", {}).get("Attributes", {})
    return attributes


def import_busybox(image: str, *, docker: tuple[str, ...] = (DOCKER,)) -> None:
    """A 2 MB image from the machine's busybox-static: there is no registry to pull from.
    `docker` is the CLI command line (with -H for a daemon other than the machine's)."""
    rootfs = Path(tempfile.mkdtemp(prefix="wnt-busybox-rootfs-"))
    rootfs.chmod(0o755)  # the image's / (mkdtemp makes it 0700)
    try:
        for sub in ("bin", "etc", "proc", "sys", "dev", "tmp"):
            (rootfs / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([*docker, "import", "-", image], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        if imported.returncode != 0:
            raise AssertionError(f"docker import failed: {imported.stderr.strip()}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def weavenet_chains() -> list[str]:
    """Our iptables chains (WEAVENET-…) in the filter and nat tables of this namespace."""
    chains = []
    for table in ("filter", "nat"):
        argv = ["iptables", "-w", "5", "-t", table, "-S"]
        rules = subprocess.run(argv, capture_output=True, text=True).stdout
        chains += sorted(set(re.findall(r"-N (WEAVENET-\S+)", rules)))
    return chains


def _docker_network_exists(name: str) -> bool:
    return docker("network", "inspect", name, check=False).returncode == 0


def weavenet_routers() -> list[str]:
    """weavenet routers (launch or plugin) running in this network namespace, as `pid cmdline`."""
    ours = os.readlink("/proc/self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if os.readlink(entry / "ns" / "net") != ours:
                continue
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv if a)
        if ("weavenet" in text and " launch" in text) or "weavenet-plugin" in text:
            found.append(f"{entry.name} {text[:120]}")
    return found


@dataclass
class HostSnapshot:
    """What the machine had before the plugin tests, so that only what they made is removed."""

    weave_bridge: bool
    gwbridge: bool
    chains: bool  # any WEAVENET-… chain
    spec_dir: bool

    @classmethod
    def take(cls) -> HostSnapshot:
        """With RootNamespaceLock held. While no weavenet router runs here, a `weave` bridge or a
        WEAVENET chain is what an aborted run left: recorded as not there before, so restore() removes it."""
        router_runs = bool(weavenet_routers())
        return cls(
            router_runs and _link_exists("weave"),
            _docker_network_exists("docker_gwbridge"),
            router_runs and bool(weavenet_chains()),
            SPEC_DIR.exists(),
        )

    def restore(self) -> None:
        with RootNamespaceLock():  # never pull the bridge from under another run's router
            self._restore()

    def _restore(self) -> None:
        if not self.spec_dir and SPEC_DIR.exists() and not any(SPEC_DIR.iterdir()):
            SPEC_DIR.rmdir()
        if not self.gwbridge and _docker_network_exists("docker_gwbridge"):
            attached = docker("network", "inspect", "-f", "{{len .Containers}}", "docker_gwbridge", check=False)
            if attached.stdout.strip() == "0":
                docker("network", "rm", "docker_gwbridge", check=False)
        if not self.weave_bridge and _link_exists("weave"):
            subprocess.run(["ip", "link", "del", "weave"], capture_output=True)
        if not self.chains:
            firewall.remove_all()


def _bindable(port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free for TCP and UDP, outside the kernel's ephemeral range: a port from that range
    (bind to 0) can be taken by any outgoing connection between this probe and the router's bind."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [p for p in range(10000, 65536) if not low <= p <= high and p not in (6783, 6784)]
    random.shuffle(candidates)
    for port in candidates:
        if _bindable(port, socket.SOCK_STREAM) and _bindable(port, socket.SOCK_DGRAM):
            return port
    raise AssertionError(f"no free port outside the ephemeral range {low}-{high}")


class DockerRouter:
    """A weavenet router serving the plugin to the machine's dockerd, under test-unique names."""

    def __init__(self, workdir: Path, *, tag: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.tag = tag or STABLE_TAG
        self.workdir = workdir
        self.mesh = f"{self.tag}mesh"  # weavemesh's stand-in
        self.glob = f"{self.tag}glob"  # weave's stand-in
        self.network = f"{self.tag}-weave"  # the automatic `weave` network's stand-in
        self.plugin_dir = STABLE_PLUGIN_DIR if self.tag == STABLE_TAG else workdir / "plugins"
        self.state_dir = workdir / "state"
        self.api_socket = workdir / "api.sock"
        self.port = free_port()
        self.extra = extra
        self.client = ApiClient(HttpAddress(unix_path=str(self.api_socket)), timeout=5.0)
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = RootNamespaceLock()  # from the first start to close()
        self.starts = 0
        self.spec_files = [SPEC_DIR / f"{name}.spec" for name in (self.mesh, self.glob)]

    @property
    def socket(self) -> Path:
        return self.plugin_dir / f"{self.mesh}.sock"

    @property
    def argv(self) -> list[str]:
        return [
            WEAVENET,
            "launch",
            "--foreground",
            "--state-dir",
            str(self.state_dir),
            "--http-addr",
            str(self.api_socket),
            "--port",
            str(self.port),
            "--nickname",
            self.tag,
            "--log-level",
            "debug",
            "--plugin-dir",
            str(self.plugin_dir),
            "--plugin-mesh-name",
            self.mesh,
            "--plugin-name",
            self.glob,
            "--plugin-network",
            self.network,
            *self.extra,
        ]

    def start(self, *, wait_network: bool = True) -> DockerRouter:
        self.lock.acquire()
        SPEC_DIR.mkdir(parents=True, exist_ok=True)
        for spec in self.spec_files:
            spec.write_text(f"unix://{self.plugin_dir / spec.with_suffix('.sock').name}\n")
        self.starts += 1
        log = open(self.workdir / f"router.{self.starts}.log", "wb")  # noqa: SIM115 (the child keeps it)
        env = {k: v for k, v in os.environ.items() if k not in ("WEAVE_PASSWORD", "EXTRA_ARGS")}
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        wait_for(self._answers, timeout=30, what=f"router {self.tag} API")
        wait_for(lambda: PluginClient(self.socket).answers(), timeout=10, what="the plugin socket")
        if wait_network:
            wait_for(self._network_ready, timeout=30, what=f"Docker network {self.network}")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise GiveUp(f"router exited ({self.process.returncode}); log:\n{self.log()[-3000:]}")
        try:
            return self.client.request("GET", "/status").status == 200
        except ApiUnreachable:
            return False

    def _network_ready(self) -> bool:
        state = self.report()["Plugin"]["Network"]
        if state["State"] == "failed" and "waiting" not in state["Error"]:
            raise GiveUp(f"Docker network {self.network} not created: {state['Error']}")
        return state["State"] in ("created", "exists")

    def report(self) -> dict[str, Any]:
        reply = self.client.request("GET", "/report", accept_json=True)
        assert reply.status == 200, reply.text
        return reply.json()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [WEAVENET, *args, "--http-addr", str(self.api_socket)], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, f"weavenet {' '.join(args)}: {result.stderr}"
        return result.stdout

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("router.*.log")))

    # --- cleanup ---

    def close(self) -> None:
        """Remove what the test made in Docker (while the plugin still answers), then stop; fails
        (after stopping) if Docker keeps a container or network of the test."""
        try:
            remove_docker_objects(self.tag)
        finally:
            try:
                code = self.stop()  # the exit code of a router a test killed before, too
                for spec in self.spec_files:
                    spec.unlink(missing_ok=True)
                self._kernel_path_gone(clean=code == 0)
            finally:
                self.lock.release()

    def _kernel_path_gone(self, *, clean: bool) -> None:
        """A router that stopped cleanly removed its VXLAN port and firewall chain itself; one a test
        killed left them, and the next router on this host would sweep them: the test does it now, so
        no later test depends on a router starting after this one."""
        device = vxlan.device_name(self.port + 1)  # --kernel-port defaults to --port + 1
        if clean:
            left = (Path("/sys/class/net") / device).exists()
            assert not left, f"router {self.tag} stopped cleanly but left {device}"
        else:
            vxlan.close_device(self.port + 1)
            if not weavenet_routers():  # the chain's name is the host's, not this router's
                firewall.close_kernel_port()


def docker_objects(tag: str) -> list[tuple[str, str, str]]:
    """(kind, id, name) of the containers named <tag>*, then of the networks named <tag>* or with a
    <tag>* driver."""
    found = []
    for line in docker_lines("ps", "-a", "--format", "{{.ID}} {{.Names}}"):
        ident, name = line.split()
        if name.startswith(tag):
            found.append(("container", ident, name))
    for line in docker_lines("network", "ls", "--format", "{{.ID}} {{.Name}} {{.Driver}}"):
        ident, name, driver = line.split()
        if name.startswith(tag) or driver.startswith(tag):
            found.append(("network", ident, f"{name} (driver {driver})"))
    return found


def remove_docker_objects(tag: str, timeout: float = 90) -> None:
    """Containers, then networks, of the tag (see docker_objects), again until none is left: a network
    can refuse while Docker still tears down an endpoint. Fails with what is left and why."""
    errors: dict[str, str] = {}

    def remove_what_is_left() -> bool:
        left = docker_objects(tag)
        for kind, ident, name in left:
            argv = ("rm", "-f", ident) if kind == "container" else ("network", "rm", ident)
            if kind == "network" and any(k == "container" for k, _, _ in left):
                continue  # a network goes once its containers have
            result = docker(*argv, check=False, timeout=60)
            if result.returncode != 0:
                errors[f"{kind} {name}"] = result.stderr.strip()
        return not docker_objects(tag)

    def what_is_left() -> str:
        left = [f"{kind} {name}" for kind, _, name in docker_objects(tag)]
        return f"Docker to remove every container and network of {tag}; left: " + "; ".join(
            f"{thing} ({errors.get(thing, 'no error')})" for thing in left
        )

    wait_for(remove_what_is_left, timeout=timeout, interval=1, what=what_is_left)


TEST_TAG = re.compile(rf"^{PREFIX}[0-9a-f]{{6}}$")  # every legacy plugin test run's names start with one


def sweep_docker() -> list[str]:
    """Remove what dead plugin test runs left in Docker (with RootNamespaceLock held). Their plugin is
    gone, so a stand-in answers Docker's teardown calls for their driver names while their networks
    are removed. A managed plugin's driver (NAME:TAG, with a '/' or ':') is no legacy run's."""
    texts = []
    for line in docker_lines("network", "ls", "--format", "{{.Name}} {{.Driver}}"):
        name, driver = line.split()
        texts += [name] if "/" in driver or ":" in driver else [name, driver]
    texts += docker_lines("ps", "-a", "--format", "{{.Names}}")
    leftovers = {text[: len(PREFIX) + 6] for text in texts if TEST_TAG.match(text[: len(PREFIX) + 6])}
    live = {p.stem[: len(PREFIX) + 6] for p in SPEC_DIR.glob(f"{PREFIX}*.spec") if _spec_alive(p)}
    dead = sorted(leftovers - live)
    for tag in dead:
        with stand_in(tag):
            remove_docker_objects(tag)
    for spec in SPEC_DIR.glob(f"{PREFIX}*.spec"):
        if spec.stem[: len(PREFIX) + 6] not in live:
            spec.unlink(missing_ok=True)
    return dead


def _serving(process: subprocess.Popen[bytes], sock: Path) -> bool:
    if process.poll() is not None:
        raise GiveUp(f"the stand-in plugin for {sock} exited ({process.returncode})")
    return PluginClient(sock).answers()


def _spec_alive(spec: Path) -> bool:
    target = spec.read_text().strip().removeprefix("unix://")
    return PluginClient(target, timeout=1).answers()


@contextlib.contextmanager
def stand_in(tag: str) -> Iterator[None]:
    """A throwaway plugin answering `{}` to everything under a dead run's driver names (or a
    router's that a test killed: Docker's calls then reach it, never the router's IPAM).

    Docker caches a legacy plugin's address at activation, so the stand-in listens where the dead
    run's spec file pointed (a new place only if the spec is gone: then Docker has not cached it).
    """
    workdir = Path(f"/tmp/{tag}-sweep")
    workdir.mkdir(exist_ok=True)
    code = (
        "import http.server, json, os, socketserver, subprocess, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    protocol_version = 'HTTP/1.1'\n"
        "    def log_message(self, *a): pass\n"
        "    def do_POST(self):\n"
        "        raw = self.rfile.read(int(self.headers.get('Content-Length') or 0))\n"
        "        if 'DeleteEndpoint' in self.path:  # what the dead router would have done\n"
        "            eid = json.loads(raw or b'{}').get('EndpointID', '')[:9]\n"
        "            subprocess.run(['ip', 'link', 'del', 'vethwl' + eid], capture_output=True)\n"
        '        act = b\'{"Implements": ["NetworkDriver", "IpamDriver"]}\'\n'
        "        body = act if 'Activate' in self.path else b'{}'\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer): daemon_threads = True\n"
        "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
        "S(sys.argv[1], H).serve_forever()\n"
    )
    processes, sockets, specs = [], [], []
    for suffix in ("mesh", "glob"):
        spec = SPEC_DIR / f"{tag}{suffix}.spec"
        sock = Path(spec.read_text().strip().removeprefix("unix://")) if spec.exists() else workdir / f"{suffix}.sock"
        sock.unlink(missing_ok=True)
        spec.write_text(f"unix://{sock}\n")
        specs.append(spec)
        sockets.append(sock)
        processes.append(subprocess.Popen([sys.executable, "-c", code, str(sock)]))
    try:
        for process, sock in zip(processes, sockets, strict=True):
            wait_for(
                lambda p=process, s=sock: _serving(p, s),
                timeout=60,  # a Python start on a busy CI machine
                what=f"the stand-in plugin on {sock}",
            )
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for spec, sock in zip(specs, sockets, strict=True):
            spec.unlink(missing_ok=True)
            sock.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


# --- an underlay link between the machine's namespace and a lab host ---

LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
# never used: the zeroconf edges of the range and the cloud metadata /24 (169.254.169.254)
AVOID = tuple(ipaddress.IPv4Network(n) for n in ("169.254.0.0/24", "169.254.169.0/24", "169.254.255.0/24"))
CUT_TABLE = "wntcut"  # nft table (inet) in the lab host while the link is cut


def _root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address (as its subnet) and route of the machine's namespace, all tables."""
    found = []
    for argv in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for word in out.split():
            with contextlib.suppress(ValueError):
                if word[0].isdigit():
                    found.append(ipaddress.IPv4Network(word, strict=False))
    return found


def free_link_local_pair() -> ipaddress.IPv4Network:
    """A /30 of 169.254.0.0/16 that no address or route of the machine overlaps."""
    taken = [net for net in _root_networks() if net.prefixlen > 0] + list(AVOID)
    candidates = list(LINK_LOCAL.subnets(new_prefix=30))
    random.shuffle(candidates)
    for candidate in candidates:
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise AssertionError("no free /30 left in 169.254.0.0/16 on this machine")


class RootLink:
    """A veth pair from the machine's namespace (dockerd and its router) to a lab host, with a
    link-local /30: the underlay for a Docker host meshed with a lab host.

    It adds one interface, `<tag>ul`, with one address (and its /30 route) to the machine, and
    touches nothing else there; close() removes it (so does removing the lab host, which takes
    the pair with it, so an aborted run's lab sweep cleans it up too). cut()/heal() drop and
    restore everything on the link with an nft table inside the lab host: silent loss, as a real
    partition, with nothing changed on the machine's side (a link down would take the machine's
    route away and tell both ends at once).
    """

    def __init__(self, host: Host, tag: str) -> None:
        self.host = host
        self.root_ifname = f"{tag}ul"
        self.host_ifname = "ulroot"
        self.subnet = ipaddress.IPv4Network("169.254.0.0/30")
        self.root_address = ""
        self.host_address = ""

    def __enter__(self) -> RootLink:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> RootLink:
        self.close()  # a previous run's (the tag is the stable one) whose lab host is still there
        self.subnet = free_link_local_pair()
        root, lab = list(self.subnet.hosts())
        self.root_address, self.host_address = str(root), str(lab)
        subprocess.run(
            ["ip", "link", "add", self.root_ifname, "type", "veth", "peer", "name", self.host_ifname,
             "netns", self.host.name],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        quiet = Path(f"/proc/sys/net/ipv6/conf/{self.root_ifname}/disable_ipv6")
        if quiet.exists():
            quiet.write_text("1\n")  # no router solicitations from the machine on this link
        subprocess.run(["ip", "addr", "add", f"{root}/30", "dev", self.root_ifname], check=True)
        subprocess.run(["ip", "link", "set", self.root_ifname, "up"], check=True)
        self.host.add_address(self.host_ifname, f"{lab}/30")
        self.host.set_link(self.host_ifname, up=True)
        return self

    def close(self) -> None:
        if _link_exists(self.root_ifname):
            deleted = subprocess.run(["ip", "link", "del", self.root_ifname], capture_output=True, text=True)
            wait_for(
                lambda: not _link_exists(self.root_ifname),
                timeout=10,
                what=f"link {self.root_ifname} to go (ip link del: {deleted.stderr.strip() or 'ok'})",
            )

    def cut(self) -> None:
        rules = (
            f"table inet {CUT_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority -300; iifname {self.host_ifname} drop; }}\n"
            f"  chain out {{ type filter hook output priority -300; oifname {self.host_ifname} drop; }}\n"
            "}\n"
        )
        self.host.run(["nft", "-f", "-"], input=rules)

    def heal(self) -> None:
        self.host.run(["nft", "delete", "table", "inet", CUT_TABLE])
