"""Lab names, lab ownership, and the sweeper that removes what aborted runs left behind.

Naming: every lab has an id `wn` + 6 lowercase hex digits (e.g. `wn1a2b3c`), and every namespace it
creates is named `<id>-<part>`: `wn1a2b3c-switch`, `wn1a2b3c-h1`, `wn1a2b3c-h1-c1`. Nothing else on
the machine may use that pattern (NETNS_PATTERN), so the sweeper can recognise lab leftovers.

Ownership: a running lab holds an exclusive flock(2) on /run/weavenet-lab/<id>.lock. The kernel
drops the lock when the owner dies, however it dies, so "lock free" means "orphaned". The sweeper
only removes orphaned labs unless told otherwise; parallel runs never sweep each other's live labs.

Sweeping a lab: SIGKILL every process whose network namespace is one of the lab's (found by
comparing /proc/<pid>/ns/net with the namespace's inode), remove the namespaces (the links, bridges
and nft tables inside go with them), then the lab's scratch directory if it made one, then the lock.
This module must never kill a process outside a lab namespace or remove a namespace that does not
match NETNS_PATTERN.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from tests.lab.wait import LabTimeout, wait_until

NETNS_RUN_DIR = "/run/netns"
LOCK_DIR = Path("/run/weavenet-lab")
LAB_ID_PATTERN = re.compile(r"wn[0-9a-f]{6}")
NETNS_PATTERN = re.compile(r"(?P<lab>wn[0-9a-f]{6})-[a-z0-9][a-z0-9-]*")


def new_lab_id() -> str:
    return "wn" + secrets.token_hex(3)


class Ownership:
    """This process's claim on a lab id: an flock held for the lab's lifetime, with a note for sweepers."""

    def __init__(self, lab_id: str, fd: int) -> None:
        self.lab_id = lab_id
        self._fd: int | None = fd

    @classmethod
    def claim(cls, lab_id: str) -> Ownership | None:
        """Lock `lab_id` for this process; None if it is taken (pick another id)."""
        if not LAB_ID_PATTERN.fullmatch(lab_id):
            raise ValueError(f"lab id {lab_id!r} does not match {LAB_ID_PATTERN.pattern}")
        LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        path = lock_path(lab_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # A sweeper may have unlinked the file between our open and our lock: then ours is not the
        # lock anyone else will look at. Check that the path still names what we hold.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        ownership = cls(lab_id, fd)
        ownership.record(workdir=None)
        return ownership

    def record(self, *, workdir: Path | None) -> None:
        """Note who owns the lab, and the scratch directory (if the lab made one) a sweeper deletes."""
        if self._fd is None:
            raise RuntimeError(f"lab {self.lab_id} was released")
        note = {"pid": os.getpid(), "started": time.time(), "workdir": str(workdir) if workdir else None}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(note).encode(), 0)

    def release(self) -> None:
        """Delete the lock file and drop the lock (the lab is gone)."""
        if self._fd is None:
            return
        try:
            lock_path(self.lab_id).unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def lock_path(lab_id: str) -> Path:
    return LOCK_DIR / f"{lab_id}.lock"


def lab_namespaces() -> dict[str, list[str]]:
    """Lab id -> names of its namespaces in /run/netns, for every lab present on the machine."""
    labs: dict[str, list[str]] = {}
    for name in sorted(pyroute2_netns.listnetns()):
        if (match := NETNS_PATTERN.fullmatch(name)) is not None:
            labs.setdefault(match["lab"], []).append(name)
    return labs


def lock_files() -> list[str]:
    """Lab ids that have a lock file (live labs, and orphans whose sweep was interrupted)."""
    if not LOCK_DIR.is_dir():
        return []
    return sorted(path.stem for path in LOCK_DIR.glob("*.lock") if LAB_ID_PATTERN.fullmatch(path.stem) is not None)


def owner_alive(lab_id: str) -> bool:
    """Whether some process still holds the lab's lock (no lock file at all: orphaned)."""
    orphaned, fd = _lock_if_orphaned(lab_id)
    if fd is not None:
        os.close(fd)
    return not orphaned


def _lock_if_orphaned(lab_id: str) -> tuple[bool, int | None]:
    """(orphaned?, fd holding the orphan's lock, if it has a lock file) for one lab id.

    A sweeper keeps holding the lock until it has removed the lock file, so no new lab can claim
    the id halfway through the sweep.
    """
    try:
        fd = os.open(lock_path(lab_id), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    return True, fd


def _read_note(lab_id: str) -> dict[str, object]:
    try:
        note = json.loads(lock_path(lab_id).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def pids_in_namespaces(paths: list[str]) -> dict[str, list[int]]:
    """Namespace path -> pids of the (non-zombie) processes living in it. Never includes us."""
    wanted: dict[tuple[int, int], str] = {}
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        wanted[(stat.st_dev, stat.st_ino)] = path
    found: dict[str, list[int]] = {}
    if not wanted:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            stat = os.stat(f"/proc/{entry}/ns/net")  # fails for zombies and vanished processes
        except OSError:
            continue
        if (namespace := wanted.get((stat.st_dev, stat.st_ino))) is not None:
            found.setdefault(namespace, []).append(int(entry))
    return found


def kill_namespace_processes(names: list[str], *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in these lab namespaces until none is left; returns the pids killed."""
    paths = [f"{NETNS_RUN_DIR}/{_checked(name)}" for name in names]
    killed: set[int] = set()

    def all_dead() -> bool:
        remaining = [pid for pids in pids_in_namespaces(paths).values() for pid in pids]
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.add(pid)
        return not remaining

    wait_until(all_dead, timeout=timeout, interval=0.02, message=f"processes in {', '.join(names)} to die")
    return sorted(killed)


def remove_namespaces(names: list[str]) -> None:
    """Unmount and delete these lab namespaces' names (already-gone ones are fine)."""
    for name in names:
        try:
            pyroute2_netns.remove(_checked(name))
        except FileNotFoundError:
            continue


def _checked(name: str) -> str:
    if NETNS_PATTERN.fullmatch(name) is None:
        raise ValueError(f"refusing to touch namespace {name!r}: not a lab namespace")
    return name


@dataclass
class SweepReport:
    swept: list[str] = field(default_factory=list)  # lab ids removed
    namespaces: list[str] = field(default_factory=list)  # namespaces removed
    killed: list[int] = field(default_factory=list)  # pids killed
    live: list[str] = field(default_factory=list)  # lab ids left alone: their owner is running
    failed: dict[str, str] = field(default_factory=dict)  # lab id -> what went wrong

    def __str__(self) -> str:
        lines = [
            f"swept {len(self.swept)} lab(s): {' '.join(self.swept) or '-'}",
            f"removed {len(self.namespaces)} namespace(s), killed {len(self.killed)} process(es)",
        ]
        if self.live:
            lines.append(f"left {len(self.live)} live lab(s) alone: {' '.join(self.live)}")
        lines += [f"FAILED {lab_id}: {problem}" for lab_id, problem in self.failed.items()]
        return "\n".join(lines)


def sweep_labs(*, include_live: bool = False, timeout: float = 10.0) -> SweepReport:
    """Remove every orphaned lab (every lab at all with include_live=True) and say what was done."""
    report = SweepReport()
    labs = lab_namespaces()
    for lab_id in sorted(set(labs) | set(lock_files())):
        orphaned, lock_fd = _lock_if_orphaned(lab_id)
        if not orphaned and not include_live:
            report.live.append(lab_id)
            continue
        names = labs.get(lab_id, [])
        try:
            report.killed += kill_namespace_processes(names, timeout=timeout)
            remove_namespaces(names)
            note = _read_note(lab_id)
            if isinstance(workdir := note.get("workdir"), str) and Path(workdir).name.startswith(lab_id):
                shutil.rmtree(workdir, ignore_errors=True)
            lock_path(lab_id).unlink(missing_ok=True)
        except (OSError, LabTimeout) as error:
            report.failed[lab_id] = str(error)
            continue
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        report.swept.append(lab_id)
        report.namespaces += names
    return report
