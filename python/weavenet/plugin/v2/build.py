"""`weavenet plugin build` and `install`: the plugin folder, `docker plugin create`, set, enable.

No registry is involved: the folder (config.json + rootfs/) is made from this host (rootfs.py)
and handed to the local daemon with the docker CLI. Each rootfs is unique (its build record holds
the name, the time and a nonce), because Docker refuses a second plugin whose rootfs is
byte-identical to another's. A plugin Docker creates locally needs no permission prompt:
`install` is build, `docker plugin set` of the given settings, then `docker plugin enable`.
When enable fails, the plugin's own reason is read back from the Docker daemon's log, so the
user sees it instead of Docker's "socket not found". Blocking; for the CLI only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from weavenet import __version__
from weavenet.plugin.v2.config_json import BUILD_INFO, SETTINGS, STATE_DIR, plugin_config
from weavenet.plugin.v2.rootfs import CACHE_DIR, RootfsError, make_rootfs

# A Docker reference with a tag: lowercase path components, then :TAG (Docker's grammar, simplified).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?"
_REFERENCE = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*:[\w][\w.-]{{0,127}}$")
ENABLE_TIMEOUT = 30  # seconds `docker plugin enable` waits for the socket (Docker's default)


class BuildError(Exception):
    """Building, creating or enabling the plugin failed; one line for the user."""


@dataclass(frozen=True)
class Built:
    name: str
    seconds: float
    rootfs_seconds: float
    folder: Path | None  # kept only when asked


def normalise_name(text: str) -> str:
    """NAME[:TAG] → NAME:TAG (Docker needs the tag in `-d NAME:TAG`); BuildError if not a reference."""
    name = text.strip()
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    if not _REFERENCE.match(name):
        raise BuildError(
            f"--name: {text!r} is not a plugin name: use lowercase NAME:TAG, e.g. weavenet/net-plugin:latest"
        )
    return name


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise BuildError("the docker command is not on PATH (needed for `docker plugin create`)")
    return found


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BuildError(f"docker {' '.join(args[:2])} did not finish within {timeout:.0f}s") from None


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else f"exit {result.returncode}").removeprefix("Error response from daemon: ")


def plugin_exists(name: str) -> bool:
    return docker("plugin", "inspect", "--format", "{{.Id}}", name).returncode == 0


def plugin_id(name: str) -> str:
    result = docker("plugin", "inspect", "--format", "{{.Id}}", name)
    return result.stdout.strip() if result.returncode == 0 else ""


def write_folder(folder: Path, name: str, *, cache_dir: Path = CACHE_DIR) -> None:
    """config.json and rootfs/ for the plugin `name` in `folder` (which must be empty or absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    rootfs = folder / "rootfs"
    try:
        make_rootfs(rootfs, cache_dir=cache_dir)
    except RootfsError as exc:
        raise BuildError(str(exc)) from None
    from weavenet import _fastdp

    record = {
        "name": name,
        "version": __version__,
        "core": _fastdp.core_version(),
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
        "nonce": secrets.token_hex(8),  # Docker refuses two plugins with byte-identical rootfs
    }
    info = rootfs / BUILD_INFO.lstrip("/")
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps(record, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(plugin_config(name), indent=2) + "\n")


def build(name: str, *, keep: Path | None = None, cache_dir: Path = CACHE_DIR) -> Built:
    """Make the folder and `docker plugin create` it. The folder is removed unless `keep`."""
    name = normalise_name(name)
    started = time.monotonic()
    if plugin_exists(name):
        raise BuildError(
            f"a plugin named {name} already exists: remove it first "
            f"(docker plugin disable {name}; docker plugin rm {name}) or give another --name"
        )
    # The state directory is a bind-mount source: Docker refuses to create a plugin without it.
    Path(STATE_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise BuildError(f"--keep: {keep} is not empty")
        folder = keep
    else:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = Path(tempfile.mkdtemp(prefix="plugin-", dir=cache_dir))  # same filesystem: hard links
    try:
        write_folder(folder, name, cache_dir=cache_dir)
        rootfs_seconds = time.monotonic() - started
        created = docker("plugin", "create", name, str(folder), timeout=300)
        if created.returncode != 0:
            raise BuildError(f"docker plugin create {name}: {_error_line(created)}")
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return Built(name, time.monotonic() - started, rootfs_seconds, keep)


def check_settings(pairs: Sequence[str]) -> list[str]:
    """KEY=VALUE pairs for `docker plugin set`, limited to the settable environment."""
    known = {s.name for s in SETTINGS}
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        if not sep or key not in known:
            raise BuildError(f"{pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
    return list(pairs)


def set_settings(name: str, pairs: Sequence[str]) -> None:
    if not pairs:
        return
    result = docker("plugin", "set", name, *pairs)
    if result.returncode != 0:
        raise BuildError(f"docker plugin set {name}: {_error_line(result)}")


def enable(name: str, *, timeout: int = ENABLE_TIMEOUT) -> float:
    """`docker plugin enable`; on failure the plugin's own reason (from the daemon log) is the error."""
    ident = plugin_id(name)
    log = DaemonLog.find()
    mark = log.mark()
    started = time.monotonic()
    result = docker("plugin", "enable", "--timeout", str(timeout), name, timeout=timeout + 60)
    if result.returncode == 0:
        return time.monotonic() - started
    reason = log.plugin_reason(ident, mark) if ident else None
    raise BuildError(f"docker plugin enable {name} failed: {reason or _error_line(result)}")


def validate(name: str, pairs: Sequence[str]) -> None:
    """Check settings as the plugin will, before building: a bad value fails in a second, not after
    Docker's 12 s wait for a socket that never comes. Uses this host's routes and ports."""
    from weavenet.config import ConfigError
    from weavenet.plugin.v2.config_json import REF_ENV
    from weavenet.plugin.v2.entrypoint import check_host, plan_from

    env = {s.name: s.default for s in SETTINGS} | {REF_ENV: name}
    env |= dict(pair.split("=", 1) for pair in pairs)
    try:
        check_host(plan_from(env), env)
    except ConfigError as exc:
        raise BuildError(str(exc)) from None


def install(name: str, pairs: Sequence[str], *, cache_dir: Path = CACHE_DIR) -> Built:
    pairs = check_settings(pairs)
    validate(normalise_name(name), pairs)
    built = build(name, cache_dir=cache_dir)
    set_settings(built.name, pairs)
    enable(built.name)
    return built


# --- the Docker daemon's log, where a managed plugin's output goes ---


@dataclass
class DaemonLog:
    """Where dockerd writes its log: a file (its stderr) or the journal. Reading is best effort."""

    path: Path | None

    @classmethod
    def find(cls) -> DaemonLog:
        """The log of the machine's dockerd: the one in /var/run/docker.pid, else one in our own network
        and pid namespaces (never another dockerd, such as a test lab's or an orphan's, logging to a file)."""
        for pid in _machine_dockerd():
            try:
                target = os.readlink(f"/proc/{pid}/fd/2")
            except OSError:
                continue
            if target.startswith("/") and Path(target).is_file():
                return cls(Path(target))
        return cls(None)

    def mark(self) -> int | float:
        """A position to read from later: a file offset, or a time for the journal."""
        if self.path is not None:
            try:
                return self.path.stat().st_size
            except OSError:
                return 0
        return time.time()

    def lines_since(self, mark: int | float) -> list[str]:
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    f.seek(int(mark))
                    return f.read().decode(errors="replace").splitlines()
            except OSError:
                return []
        if shutil.which("journalctl") is None:
            return []
        since = datetime.fromtimestamp(float(mark)).strftime("%Y-%m-%d %H:%M:%S")
        result = subprocess.run(
            ["journalctl", "-u", "docker", "--since", since, "-o", "cat", "--no-pager"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return result.stdout.splitlines()

    def plugin_lines(self, ident: str, mark: int | float) -> list[str]:
        """The plugin's own output lines (dockerd tags them `plugin=<id>`), unquoted."""
        found = []
        for line in self.lines_since(mark):
            if f"plugin={ident}" not in line:
                continue
            match = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
            found.append(match.group(1).replace('\\"', '"').replace("\\\\", "\\") if match else line)
        return found

    def plugin_reason(self, ident: str, mark: int | float) -> str | None:
        """The line the entry point wrote when it refused to start, if any."""
        lines = self.plugin_lines(ident, mark)
        for line in reversed(lines):
            if line.startswith("weavenet plugin:"):
                return line.removeprefix("weavenet plugin: ")
        return None


def _machine_dockerd() -> list[int]:
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd":
            return [pid]
    except (OSError, ValueError):
        pass  # no pid file, or a stale one
    return [pid for pid in _pids_of("dockerd") if _in_our_namespaces(pid)]


def _in_our_namespaces(pid: int) -> bool:
    try:
        return all(os.readlink(f"/proc/{pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "pid"))
    except OSError:
        return False


def _pids_of(command: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == command:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
