"""Docker daemons of our own, two "hosts" made of namespaces and joined by an underlay.

For what the machine's one dockerd cannot show: several Docker engines that see each other (a
cluster store, a swarm). Topology, all inside namespaces named `<tag>-hub|a|b`:

    <tag>-hub  bridge ulbr <subnet>.254/24 (and whatever the lab runs there, e.g. etcd)
    <tag>-a    ul0 <subnet>.1/24, then `unshare --mount --uts --pid`: a private /run (so its own
    <tag>-b    /run/docker/plugins, where Docker 20.10 keeps managed plugins' sockets whatever
               --exec-root says, and its own /run/docker.sock), its own /etc/docker (no system
               daemon.json), /sys of its network namespace; then the lab's script (HOST_BODY):
               at least a dockerd on its own root, reachable at <workdir>/<name>/docker.sock

Nothing touches the machine's own dockerd, /run/docker/plugins or network namespace: each host's
dockerd, containerd, routers, plugins and containers live and die in its pid namespace. `close()`
stops the hosts, the hub, removes the namespaces, cgroups and the work dir; `sweep()` does the same
for dead runs. Follows shared/spec/cluster-store-lab.md (C1-C15 there explain each step).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from tests.plugin_helpers import GiveUp, import_busybox, wait_for

DOCKERD = "/usr/sbin/dockerd"
DOCKER_CLI = "/usr/bin/docker"  # the 20.10 CLI: the 28 one hides the cluster store in `docker info`
WEAVENET = str(Path(sys.executable).with_name("weavenet"))
LOCK_DIR = Path("/run/weavenet-lab")  # a live lab holds an flock on <tag>.lock (as tests/lab does)
IMAGE = "busybox"  # imported into every host's dockerd

HOST_PRELUDE = r"""
set -eu
W=$1; NAME=$2; ADDR=$3; TAG=$4; D=$W/$NAME
mount -n -t tmpfs tmpfs /run                     # private /run: its own /run/docker/plugins
mkdir -p /run/docker/plugins $D/cg
mount --rbind /sys/fs/cgroup $D/cg; mount -t sysfs sysfs /sys; mount --move $D/cg /sys/fs/cgroup
mount -n -t tmpfs tmpfs /etc/docker              # no system daemon.json, a key.json of its own
hostname $TAG-$NAME
ip link set lo up
"""
# The body sets PIDS: what to stop, in order, on SIGTERM.
HOST_EPILOGUE = r"""
stop() { for pid in $PIDS; do kill -TERM $pid 2>/dev/null; wait $pid || true; done; exit 0; }
trap stop TERM INT
wait
"""
DOCKERD_FLAGS = (
    "--data-root $D/data --exec-root $D/exec --pidfile $D/docker.pid --bridge=none --iptables=false "
    "--ip-masq=false --storage-driver=vfs --cgroup-parent=/$TAG-$NAME"
)


def dockerd_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run([DOCKERD, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    words = out.replace(",", " ").split()
    try:
        text = words[words.index("version") + 1]
    except (ValueError, IndexError):
        return None
    return tuple(int(part) for part in text.split("+")[0].split("-")[0].split(".") if part.isdigit())


def run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class DockerHost:
    LOGS: ClassVar[tuple[str, ...]] = ("launcher.log", "dockerd.log")

    def __init__(self, lab: DockerHostsLab, name: str, address: str) -> None:
        self.lab = lab
        self.name = name
        self.address = address
        self.netns = f"{lab.tag}-{name}"
        self.dir = lab.workdir / name
        self.launcher: subprocess.Popen[bytes] | None = None

    @property
    def docker_socket(self) -> Path:
        return self.dir / "docker.sock"

    def start(self, env: dict[str, str]) -> None:
        self.dir.mkdir(parents=True)
        log = open(self.dir / "launcher.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.launcher = subprocess.Popen(
            [
                *["nsenter", f"--net=/run/netns/{self.netns}"],
                *["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--propagation", "private"],
                *["--kill-child=SIGTERM", "bash", str(self.lab.workdir / "host.sh")],
                *[str(self.lab.workdir), self.name, self.address, self.lab.tag],
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WEAVENET": WEAVENET, "DOCKERD": DOCKERD} | env,
            start_new_session=True,
        )
        log.close()

    def init_pid(self) -> int | None:
        """The host's pid-namespace init (the bash running host.sh), as the machine sees it."""
        if self.launcher is None:
            return None
        children = run("pgrep", "-P", str(self.launcher.pid), check=False).stdout.split()
        return int(children[0]) if children else None

    @property
    def cli(self) -> tuple[str, ...]:
        """The docker command line for this host's daemon."""
        return (DOCKER_CLI, "-H", f"unix://{self.docker_socket}")

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run(*self.cli, *args, check=check, timeout=timeout)

    def inside(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's network and mount namespaces."""
        pid = self.init_pid()
        assert pid is not None, f"host {self.name} is not running"
        return run("nsenter", "-t", str(pid), "-m", "-n", *argv, check=check)

    def ready(self) -> bool:
        if self.launcher is not None and self.launcher.poll() is not None:
            raise GiveUp(f"host {self.name} exited: {self.logs()}")
        return self.docker_socket.exists() and self.docker("info", check=False, timeout=10).returncode == 0

    def logs(self) -> str:
        parts = []
        for name in self.LOGS:
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {self.name}/{name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self, timeout: float = 20) -> None:
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # the pid namespace's init: everything in it dies
                self.launcher.kill()
                self.launcher.wait(10)


class DockerHostsLab:
    """The hub and hosts a and b; use as a context manager. Subclasses give the prefix of their tag
    (also what `sweep` recognises), the underlay's /24, the hosts' script and their hub's service."""

    PREFIX: ClassVar[str]
    SUBNET: ClassVar[str]  # the underlay's first three octets
    HOST_BODY: ClassVar[str]
    HOST_CLASS: ClassVar[type[DockerHost]] = DockerHost

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{self.PREFIX}{secrets.token_hex(4)}"
        self.workdir = Path(f"/tmp/{self.tag}")  # short: containerd's sockets live under it (max 104)
        self.hub = f"{self.tag}-hub"
        self.hub_address = f"{self.SUBNET}.254"
        self.a = self.HOST_CLASS(self, "a", f"{self.SUBNET}.1")
        self.b = self.HOST_CLASS(self, "b", f"{self.SUBNET}.2")
        self.setup_seconds = 0.0
        self._lock: Any = None

    @property
    def hosts(self) -> tuple[DockerHost, DockerHost]:
        return self.a, self.b

    def __enter__(self) -> DockerHostsLab:
        self._take_lock()  # outside the try: a lab another run holds must not be closed by us
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what subclasses add ---

    def host_env(self) -> dict[str, str]:
        return {}

    def start_hub(self) -> None:
        """Start the hub's service (called before the hosts start)."""

    def stop_hub(self) -> None:
        """Stop the hub's service."""

    def after_start(self) -> None:
        """Once every dockerd answers and has the image."""

    # --- the lab ---

    def start(self) -> None:
        began = time.monotonic()
        self._take_lock()
        if stale := [n for n in self._namespaces() if Path(f"/run/netns/{n}").exists()]:
            raise AssertionError(f"namespaces {', '.join(stale)} of a dead lab {self.tag} exist: sweep() removes them")
        shutil.rmtree(self.workdir, ignore_errors=True)  # a dead run's with this tag: we hold the tag's lock
        self.workdir.mkdir(parents=True)
        (self.workdir / "host.sh").write_text(HOST_PRELUDE + self.HOST_BODY + HOST_EPILOGUE)
        for name in (self.hub, self.a.netns, self.b.netns):
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        run("ip", "-n", self.hub, "link", "add", "ulbr", "type", "bridge")
        run("ip", "-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "ulbr")
        run("ip", "-n", self.hub, "link", "set", "ulbr", "up")
        for host in self.hosts:
            # made in the namespaces directly: the machine's namespace never holds one of them
            peer = f"ul-{host.name}"
            run("ip", "link", "add", "ul0", "mtu", "1600", "netns", host.netns, "type", "veth",
                "peer", "name", peer, "mtu", "1600", "netns", self.hub)  # fmt: skip
            run("ip", "-n", self.hub, "link", "set", peer, "master", "ulbr", "up")
            run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "ul0")
            run("ip", "-n", host.netns, "link", "set", "ul0", "up")
        self.start_hub()
        for host in self.hosts:
            host.start(self.host_env())
        for host in self.hosts:
            wait_for(host.ready, timeout=60, what=f"dockerd on host {host.name}", interval=0.2)
            import_busybox(IMAGE, docker=host.cli)
        self.after_start()
        self.setup_seconds = time.monotonic() - began

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(LOCK_DIR / f"{self.tag}.lock", "w")  # noqa: SIM115 (held while the lab lives)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise AssertionError(f"lab {self.tag} is in use by another run") from None
        self._lock = lock

    def hub_run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.hub, *argv, check=check)

    def _namespaces(self) -> tuple[str, ...]:
        return (self.a.netns, self.b.netns, self.hub)

    def close(self) -> None:
        """Stop the hosts and the hub, kill what is left and wait until it is gone (a namespace or a
        cgroup still in use cannot go), then remove namespaces, cgroups and the work dir. Tries
        everything, then fails saying what stayed."""
        problems: list[str] = []
        for host in self.hosts:
            try:
                host.stop()
            except Exception as exc:
                problems.append(f"stopping host {host.name}: {exc}")
        try:
            self.stop_hub()
        except Exception as exc:
            problems.append(f"stopping the hub: {exc}")
        cgroups = [group for host in self.hosts for group in cgroup_dirs(f"{self.tag}-{host.name}")]

        def processes() -> list[int]:
            """The lab's processes: in its namespaces, or (containers, in namespaces of their own) its cgroups."""
            pids = {int(pid) for name in self._namespaces() for pid in netns_pids(name)}
            return sorted(pids | {pid for group in cgroups for pid in cgroup_pids(group)})

        for pid in processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            wait_for(lambda: not processes(), timeout=30, what=lambda: f"the lab's processes to die: {processes()}")
        except AssertionError as exc:
            problems.append(str(exc))
        for name in self._namespaces():
            if Path(f"/run/netns/{name}").exists():
                deleted = run("ip", "netns", "del", name, check=False)
                if deleted.returncode != 0:
                    problems.append(f"ip netns del {name}: {deleted.stderr.strip()}")
        for group in cgroups:
            problems += remove_cgroup(group)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.workdir.exists():
            problems.append(f"{self.workdir} could not be removed")
        if self._lock is not None:
            (LOCK_DIR / f"{self.tag}.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None
        if problems:
            raise AssertionError(f"lab {self.tag} not fully removed: " + "; ".join(problems))

    def logs(self) -> str:
        return "\n".join(host.logs() for host in self.hosts)

    def keep_logs(self, target: Path) -> None:
        """Copy every log of the lab to `target` (before close() removes the work dir)."""
        for log in self.workdir.glob("*/*.log"):
            destination = target / log.parent.name / log.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, destination)

    @classmethod
    def sweep(cls) -> list[str]:
        """Remove what dead runs of this kind of lab left: namespaces `<PREFIX><hex>-…`, their
        processes, cgroups and work dirs /tmp/<PREFIX><hex>. A lab whose lock is held is alive and
        left alone."""
        tag = re.compile(rf"^{cls.PREFIX}[0-9a-f]{{4,8}}$")
        names = [line.split()[0] for line in run("ip", "netns", "list", check=False).stdout.splitlines() if line]
        tags = {n.rsplit("-", 1)[0] for n in names if "-" in n} | {p.name for p in Path("/tmp").iterdir()}
        found = sorted(t for t in tags if tag.match(t))
        orphans = []
        for tag in found:
            lock_path = LOCK_DIR / f"{tag}.lock"
            if lock_path.exists():
                with open(lock_path) as lock:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a live run owns it
                lock_path.unlink(missing_ok=True)
            orphans.append(tag)
            cls(tag).close()
        return orphans


def cgroup_dirs(name: str) -> list[Path]:
    """Where dockerd's --cgroup-parent=/<name> made cgroups: /sys/fs/cgroup/<name> on cgroup v2 (one
    hierarchy), <hierarchy>/<name> in each cgroup v1 hierarchy (and a hybrid host's unified one)."""
    root = Path("/sys/fs/cgroup")
    if not root.is_dir():
        return []
    candidates = [root / name] + [hierarchy / name for hierarchy in root.iterdir() if hierarchy.is_dir()]
    return [group for group in candidates if group.is_dir()]


def cgroup_pids(cgroup: Path) -> set[int]:
    """The processes in a cgroup and its children."""
    pids: set[int] = set()
    for procs in [cgroup / "cgroup.procs", *cgroup.rglob("*/cgroup.procs")]:
        with contextlib.suppress(OSError):
            pids |= {int(pid) for pid in procs.read_text().split()}
    return pids


def netns_pids(name: str) -> list[str]:
    return run("ip", "netns", "pids", name, check=False).stdout.split()


def remove_cgroup(cgroup: Path) -> list[str]:
    """An emptied cgroup directory and its children, deepest first; what could not be removed."""
    problems: list[str] = []
    for sub in sorted([cgroup, *cgroup.rglob("*")], key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            try:
                sub.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"rmdir {sub}: {exc.strerror}")
    return problems


def weavenet_json(host: DockerHost, *args: str) -> Any:
    """`weavenet ARGS` (JSON output) run in the host's network namespace, against its router's API
    on 127.0.0.1:6784 (where the managed plugin's router listens)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WEAVE_HTTP_ADDR", "EXTRA_ARGS", "WEAVE_PASSWORD")}
    result = subprocess.run(
        ["nsenter", f"--net=/run/netns/{host.netns}", WEAVENET, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    if result.returncode != 0:
        raise AssertionError(f"weavenet {' '.join(args)} on {host.name}: {result.stderr.strip()}")
    return json.loads(result.stdout)
