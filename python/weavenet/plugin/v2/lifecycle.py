"""`weavenet plugin disable` and `remove`: let Docker finish with the plugin's networks first.

Docker counts a managed network plugin's users: +1 when the daemon makes its local copy of a
network of the plugin, -1 when it deletes that copy (moby's daemon/network.go, createNetwork /
deleteNetwork → plugin/store.go Get(…, Acquire|Release)). A release that arrives while the plugin
is disabled is refused ("plugin … found but disabled", logged as "Error handling plugin refcount
operation") and never retried, so the count stays up for the daemon's lifetime, and every later
`docker plugin disable` or `rm` without -f says "is in use" although no network uses it.

That happens whenever the plugin is disabled while Docker still deletes a local copy: in swarm
mode the node's agent deletes it after `docker network rm` (or `service rm`) has returned. So
these commands first wait until Docker lists no network of the plugin, then disable; if Docker
still counts a user with no network left, the count is stale, and they say so and use --force,
which is all a user can do short of restarting the daemon. Blocking; for the CLI only.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

from weavenet.plugin.v2.build import BuildError, _error_line, docker, normalise_name

NETWORKS_WAIT = 30.0  # seconds to wait for Docker to delete its copies of the plugin's networks
RELEASE_WAIT = 2.0  # seconds for Docker to drop its reference once the last network has gone
POLL = 0.25
STALE_REASON = (
    "Docker still counts the plugin as in use although no network of it is left: Docker drops the "
    "release of a network deleted while the plugin was disabled (its log says 'Error handling plugin "
    "refcount operation'), and only a daemon restart resets that count"
)


@dataclass
class Outcome:
    """What was done, in lines for the user; `forced` when Docker's stale count needed --force."""

    lines: list[str] = field(default_factory=list)
    forced: bool = False

    def text(self) -> str:
        return "\n".join(self.lines)


def networks_of(name: str) -> list[str]:
    """Networks Docker lists for the driver: the cluster's and this daemon's local copies."""
    result = docker("network", "ls", "--filter", f"driver={name}", "--format", "{{.Name}}")
    if result.returncode != 0:
        raise BuildError(f"docker network ls: {_error_line(result)}")
    return sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})


def is_enabled(name: str) -> bool:
    result = docker("plugin", "inspect", "--format", "{{.Enabled}}", name)
    if result.returncode != 0:
        raise BuildError(f"no plugin named {name} ({_error_line(result)})")
    return result.stdout.strip() == "true"


def wait_for_networks_to_go(name: str, timeout: float) -> list[str]:
    """Poll until Docker lists no network of the plugin; what is still listed at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := networks_of(name)) and time.monotonic() < deadline:
        time.sleep(POLL)
    return left


def _in_use(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "in use" in result.stderr


def disable(name: str, *, force: bool = False, wait: float = NETWORKS_WAIT) -> Outcome:
    """Disable once Docker is done with the plugin's networks; --force for networks still in use."""
    name = normalise_name(name)
    outcome = Outcome()
    if not is_enabled(name):
        outcome.lines.append(f"plugin {name} is already disabled")
        return outcome
    left = wait_for_networks_to_go(name, 0 if force else wait)
    if left and not force:
        raise BuildError(
            f"{name} still has networks: {', '.join(left)}; remove them first (docker network rm "
            f"{' '.join(left)}), or --force to disable anyway (their containers lose the network until "
            "it is enabled again)"
        )
    if left:
        outcome.lines.append(f"disabling with --force: networks {', '.join(left)} keep their containers")
        _disable(name, force=True)
    else:
        deadline = time.monotonic() + RELEASE_WAIT
        while _in_use(result := docker("plugin", "disable", name)) and time.monotonic() < deadline:
            time.sleep(POLL)
        if _in_use(result):
            outcome.lines.append(f"note: {STALE_REASON}; disabling with --force")
            outcome.forced = True
            _disable(name, force=True)
        elif result.returncode != 0:
            raise BuildError(f"docker plugin disable {name}: {_error_line(result)}")
    outcome.lines.append(f"plugin {name} disabled")
    return outcome


def _disable(name: str, *, force: bool) -> None:
    result = docker("plugin", "disable", *(["-f"] if force else []), name)
    if result.returncode != 0:
        raise BuildError(f"docker plugin disable {name}: {_error_line(result)}")


def remove(name: str, *, force: bool = False, wait: float = NETWORKS_WAIT) -> Outcome:
    """Disable as above, then `docker plugin rm` (which refuses a stale count too)."""
    name = normalise_name(name)
    outcome = disable(name, force=force, wait=wait)
    removed = docker("plugin", "rm", name)
    if _in_use(removed):
        # Docker's rm checks the same count: stale (no network left) or, with --force, networks in use.
        if left := networks_of(name):
            if not force:
                raise BuildError(f"{name} still has networks: {', '.join(left)}; remove them first, or --force")
            outcome.lines.append(f"removing with --force: networks {', '.join(left)} still use it")
        elif not outcome.forced:
            outcome.lines.append(f"note: {STALE_REASON}; removing with --force")
            outcome.forced = True
        removed = docker("plugin", "rm", "-f", name)
    if removed.returncode != 0:
        raise BuildError(f"docker plugin rm {name}: {_error_line(removed)}")
    outcome.lines.append(f"plugin {name} removed (its state directory stays)")
    return outcome
