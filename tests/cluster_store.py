"""Two Docker 20.10 daemons sharing an etcd cluster store, each beside its own weavenet router.

The only way left to run a global-scope legacy network driver (`weave`): Docker removed the cluster
store in 23.0. Topology (all inside namespaces named `<tag>-kv|a|b`, `<tag>` = `wcs` + 4 hex):

    <tag>-kv   bridge ulbr 192.168.252.254/24, etcd :2379 (v2 API)
    <tag>-a    ul0 192.168.252.1/24; own mount, uts and pid namespaces with a private /run and
    <tag>-b    /etc/docker (.2): weavenet router (plugin sockets in that /run/docker/plugins; its
               Rust datapath on by default: bridge weave, TAP weave-dp, UDP 6783 over ul0), then
               dockerd --cluster-store etcd://192.168.252.254:2379/<tag> on its own root and socket

Nothing touches the machine's own dockerd, /run/docker/plugins or network namespace: each host's
dockerd, containerd, router and containers live and die in its pid namespace. `close()` stops the
hosts (dockerd first, then the router), etcd, removes the namespaces, cgroups and the work dir.
Follows shared/spec/cluster-store-lab.md (C1-C15 there explain each step).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.plugin_helpers import BUSYBOX, wait_for

DOCKERD = "/usr/sbin/dockerd"
DOCKER_CLI = "/usr/bin/docker"  # the 20.10 CLI: the 28 one hides the cluster store in `docker info`
ETCD = "/usr/bin/etcd"
KV_ADDRESS = "192.168.252.254"
WEAVENET = str(Path(sys.executable).with_name("weavenet"))
LOCK_DIR = Path("/run/weavenet-lab")  # a live lab holds an flock on wcs<tag>.lock (as tests/lab does)

HOST_SCRIPT = r"""
set -eu
W=$1; NAME=$2; ADDR=$3; TAG=$4; D=$W/$NAME
mount -n -t tmpfs tmpfs /run                     # private /run: its own /run/docker/plugins
mkdir -p /run/docker/plugins $D/cg
mount --rbind /sys/fs/cgroup $D/cg; mount -t sysfs sysfs /sys; mount --move $D/cg /sys/fs/cgroup
mount -n -t tmpfs tmpfs /etc/docker              # no system daemon.json, a key.json of its own
hostname $TAG-$NAME
ip link set lo up
"$WEAVENET" launch --foreground --state-dir $D/state --http-addr $D/api.sock --nickname $TAG-$NAME \
    --plugin-dir /run/docker/plugins --plugin-network "" --docker-api unix://$D/docker.sock \
    --log-level debug > $D/router.log 2>&1 &
RPID=$!
for i in $(seq 300); do [ -S /run/docker/plugins/weave.sock ] && break; sleep 0.1; done
"$DOCKERD" --data-root $D/data --exec-root $D/exec -H unix://$D/docker.sock --pidfile $D/docker.pid \
    --bridge=none --iptables=false --ip-masq=false --storage-driver=vfs --cgroup-parent=/$TAG-$NAME \
    --cluster-store=etcd://$KV:2379/$TAG --cluster-advertise=$ADDR:2376 \
    --cluster-store-opt discovery.heartbeat=2 --cluster-store-opt discovery.ttl=6 > $D/dockerd.log 2>&1 &
DPID=$!
stop() { kill -TERM $DPID 2>/dev/null; wait $DPID || true; kill -TERM $RPID 2>/dev/null; wait $RPID || true; exit 0; }
trap stop TERM INT
wait
"""


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


def _run(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class StoreHost:
    def __init__(self, lab: ClusterStoreLab, name: str, address: str) -> None:
        self.lab = lab
        self.name = name
        self.address = address
        self.netns = f"{lab.tag}-{name}"
        self.dir = lab.workdir / name
        self.launcher: subprocess.Popen[bytes] | None = None

    @property
    def docker_socket(self) -> Path:
        return self.dir / "docker.sock"

    @property
    def api_socket(self) -> Path:
        return self.dir / "api.sock"

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        env = {**os.environ, "WEAVENET": WEAVENET, "DOCKERD": DOCKERD, "KV": KV_ADDRESS}
        env.pop("WEAVE_PASSWORD", None)
        env.pop("EXTRA_ARGS", None)
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
            env=env,
            start_new_session=True,
        )
        log.close()

    def init_pid(self) -> int | None:
        """The host's pid-namespace init (the bash running host.sh), as the machine sees it."""
        if self.launcher is None:
            return None
        children = _run("pgrep", "-P", str(self.launcher.pid), check=False).stdout.split()
        return int(children[0]) if children else None

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return _run(DOCKER_CLI, "-H", f"unix://{self.docker_socket}", *args, check=check, timeout=timeout)

    def inside(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's network and mount namespaces."""
        pid = self.init_pid()
        assert pid is not None, f"host {self.name} is not running"
        return _run("nsenter", "-t", str(pid), "-m", "-n", *argv, check=check)

    def report(self) -> dict[str, Any]:
        out = _run(
            "curl", "-sf", "--unix-socket", str(self.api_socket), "-H", "Accept: application/json", "http://x/report"
        )
        return json.loads(out.stdout)

    def ready(self) -> bool:
        if self.launcher is not None and self.launcher.poll() is not None:
            raise AssertionError(f"host {self.name} exited: {self.logs()}")
        return self.docker_socket.exists() and self.docker("info", check=False, timeout=10).returncode == 0

    def logs(self) -> str:
        parts = []
        for name in ("launcher.log", "router.log", "dockerd.log"):
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


class ClusterStoreLab:
    """etcd plus hosts a and b; use as a context manager."""

    def __init__(self) -> None:
        self.tag = f"wcs{secrets.token_hex(2)}"
        self.workdir = Path(f"/tmp/{self.tag}")  # short: containerd's sockets live under it (max 104)
        self.a = StoreHost(self, "a", "192.168.252.1")
        self.b = StoreHost(self, "b", "192.168.252.2")
        self.etcd: subprocess.Popen[bytes] | None = None
        self._lock: Any = None

    @property
    def hosts(self) -> tuple[StoreHost, StoreHost]:
        return self.a, self.b

    def __enter__(self) -> ClusterStoreLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        began = time.monotonic()
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_DIR / f"{self.tag}.lock", "w")  # noqa: SIM115 (held while the lab lives)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "host.sh").write_text(HOST_SCRIPT)
        kv = f"{self.tag}-kv"
        for name in (kv, self.a.netns, self.b.netns):
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", kv, "link", "add", "ulbr", "type", "bridge")
        _run("ip", "-n", kv, "addr", "add", f"{KV_ADDRESS}/24", "dev", "ulbr")
        _run("ip", "-n", kv, "link", "set", "ulbr", "up")
        for host in self.hosts:
            # made in the namespaces directly: the machine's namespace never holds one of them
            peer = f"ul-{host.name}"
            _run("ip", "link", "add", "ul0", "mtu", "1600", "netns", host.netns, "type", "veth",
                 "peer", "name", peer, "mtu", "1600", "netns", kv)  # fmt: skip
            _run("ip", "-n", kv, "link", "set", peer, "master", "ulbr", "up")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "ul0")
            _run("ip", "-n", host.netns, "link", "set", "ul0", "up")
        (self.workdir / "kv").mkdir()
        etcd_log = open(self.workdir / "kv" / "etcd.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.etcd = subprocess.Popen(
            [
                *["ip", "netns", "exec", kv, ETCD, "--name", kv, "--data-dir", str(self.workdir / "kv" / "data")],
                *["--listen-client-urls", f"http://{KV_ADDRESS}:2379"],
                *["--advertise-client-urls", f"http://{KV_ADDRESS}:2379"],
                *[
                    "--listen-peer-urls",
                    "http://127.0.0.1:2380",
                    "--initial-advertise-peer-urls",
                    "http://127.0.0.1:2380",
                ],
                *["--initial-cluster", f"{kv}=http://127.0.0.1:2380", "--enable-v2=true"],
            ],
            stdout=etcd_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        etcd_log.close()
        wait_for(self._etcd_ready, timeout=20, what="etcd's v2 API", interval=0.1)
        for host in self.hosts:
            host.start()
        for host in self.hosts:
            wait_for(host.ready, timeout=60, what=f"dockerd on host {host.name}", interval=0.2)
        wait_for(lambda: len(self.registered_nodes()) == 2, timeout=30, what="both daemons in the store")
        for host in self.hosts:
            self._import_busybox(host)
        self.setup_seconds = time.monotonic() - began

    def _etcd_ready(self) -> bool:
        probe = _run(
            "ip", "netns", "exec", self.a.netns, "curl", "-sf", f"http://{KV_ADDRESS}:2379/v2/keys/", check=False
        )
        return probe.returncode == 0

    def registered_nodes(self) -> list[str]:
        probe = _run(
            *["ip", "netns", "exec", self.a.netns, "curl", "-sf"],
            f"http://{KV_ADDRESS}:2379/v2/keys/{self.tag}/docker/nodes",
            check=False,
        )
        if probe.returncode != 0:
            return []
        nodes = json.loads(probe.stdout).get("node", {}).get("nodes", [])
        return [str(n.get("value")) for n in nodes]

    def _import_busybox(self, host: StoreHost) -> None:
        rootfs = host.dir / "rootfs"
        for sub in ("bin", "etc", "proc", "sys", "dev", "tmp"):
            (rootfs / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in _run(str(BUSYBOX), "--list").stdout.split():
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [DOCKER_CLI, "-H", f"unix://{host.docker_socket}", "import", "-", "busybox"],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
        )
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
        if imported.returncode != 0:
            raise AssertionError(f"docker import on {host.name}: {imported.stderr.strip()}")

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()
        if self.etcd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.etcd.pid, signal.SIGTERM)
            try:
                self.etcd.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.etcd.pid, signal.SIGKILL)
                self.etcd.wait(5)
        for name in (self.a.netns, self.b.netns, f"{self.tag}-kv"):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", name, check=False)
        for host in self.hosts:
            for controller in Path("/sys/fs/cgroup").iterdir():
                cgroup = controller / f"{self.tag}-{host.name}"
                if cgroup.is_dir():
                    for sub in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                        if sub.is_dir():
                            with contextlib.suppress(OSError):
                                sub.rmdir()
                    with contextlib.suppress(OSError):
                        cgroup.rmdir()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock is not None:
            (LOCK_DIR / f"{self.tag}.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def logs(self) -> str:
        return "\n".join(host.logs() for host in self.hosts)

    def keep_logs(self, target: Path) -> None:
        """Copy every log of the lab to `target` (before close() removes the work dir)."""
        for log in self.workdir.glob("*/*.log"):
            destination = target / log.parent.name / log.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, destination)


def sweep_cluster_store_labs() -> list[str]:
    """Remove what dead runs left: namespaces `wcs<4 hex>-kv|a|b` with their processes, cgroups."""
    names = _run("ip", "netns", "list", check=False).stdout.split("\n")
    found = sorted({n.split()[0].rsplit("-", 1)[0] for n in names if n.startswith("wcs") and "-" in n.split()[0]})
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
        lab = ClusterStoreLab()
        lab.tag, lab.workdir = tag, Path(f"/tmp/{tag}")
        lab.a.netns, lab.b.netns = f"{tag}-a", f"{tag}-b"
        lab.close()
    return orphans
