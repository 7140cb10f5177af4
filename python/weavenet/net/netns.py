"""Naming a network namespace to attach to: a name under /run/netns, a path, or a container.

A target resolves to a `Namespace` (a path we can open, and the identity IPAM records the
addresses under). Docker containers are looked up by the caller-supplied resolver, so this module
never talks to Docker itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NETNS_RUN_DIR = Path("/run/netns")


class TargetError(Exception):
    """The target names no network namespace we can reach."""


@dataclass(frozen=True)
class Namespace:
    path: str  # /run/netns/NAME, /proc/PID/ns/net, or another bind-mounted nsfs file
    ident: str  # IPAM identity: the container id, "netns:NAME", or "netns:ino<inode>" for other paths

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def short_id(self, length: int = 7) -> str:
        """A stable short tag for interface names (IFNAMSIZ leaves few characters)."""
        return hashlib.sha256(self.ident.encode()).hexdigest()[:length]


ContainerResolver = Callable[[str], "tuple[str, int] | None"]  # name/id → (full id, pid) or None


def resolve(target: str, containers: ContainerResolver | None = None) -> Namespace:
    """Resolve TARGET: an absolute nsfs path, a /run/netns name, or a container name/id."""
    target = target.strip()
    if not target:
        raise TargetError("empty target: give a container, a network namespace name or a path")
    if target.startswith("/"):
        if not os.path.exists(target):
            raise TargetError(f"{target}: no such file")
        path = Path(target)
        if path.parent == NETNS_RUN_DIR:
            return Namespace(path=target, ident=f"netns:{path.name}")
        # IPAM identities may not contain '/': name an arbitrary nsfs file by its inode.
        return Namespace(path=target, ident=f"netns:ino{os.stat(target).st_ino}")
    named = NETNS_RUN_DIR / target
    if "/" not in target and named.exists():
        return Namespace(path=str(named), ident=f"netns:{target}")
    if containers is not None:
        found = containers(target)
        if found is not None:
            container_id, pid = found
            if pid <= 0:
                raise TargetError(f"container {target} is not running")
            return Namespace(path=f"/proc/{pid}/ns/net", ident=container_id)
    raise TargetError(f"{target}: no such container or network namespace")


@contextmanager
def opened(ns: Namespace) -> Iterator[int]:
    """An open file descriptor for the namespace, for netlink's net_ns_fd and NetNS."""
    try:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot open network namespace {ns.path}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)
