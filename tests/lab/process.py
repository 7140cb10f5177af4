"""Programs inside a lab namespace: run one to completion, or start one and watch, signal, restart it.

Every program enters its namespace through `nsenter --net=<path> -- argv` (nsenter execs, so the pid
we keep is the program's own) and starts in a new session, so the program and its children form one
process group that is signalled as a whole. This module must never leave a process unaccounted
for (each started process is owned by a LabProcess whose stop() ends its whole group) and must
never wait without a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.lab.wait import Deadline, LabTimeout, wait_until

NSENTER = "nsenter"

# An environment for a lab program: values override the current environment, None unsets.
Env = Mapping[str, str | None]


class CommandFailed(subprocess.CalledProcessError):
    """`run(..., check=True)` saw a non-zero exit; the message names where and shows stderr."""

    def __init__(self, where: str, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {_describe_exit(self.returncode)}: {_shell_line(self.cmd)}{_tail(self.stderr)}"


class CommandTimeout(subprocess.TimeoutExpired):
    """`run(..., timeout=...)` ran out of time; the process group was killed."""

    def __init__(self, where: str, argv: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(list(argv), timeout, stdout, stderr)
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: still running after {self.timeout:g}s, killed: {_shell_line(self.cmd)}" + _tail(
            self.stderr if isinstance(self.stderr, str) else None
        )


def netns_argv(netns_path: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` inside the network namespace at `netns_path`."""
    if not argv:
        raise ValueError("empty command line")
    return [NSENTER, f"--net={netns_path}", "--", *argv]


def child_env(env: Env | None, *, unbuffered: bool = False) -> dict[str, str]:
    """The current environment with `env` applied (None values unset a variable)."""
    result = dict(os.environ)
    if unbuffered:
        # Logs of Python programs should show up while they run, not when they exit.
        result.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in (env or {}).items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def run_in_netns(
    netns_path: str,
    argv: Sequence[str],
    *,
    where: str,
    check: bool = True,
    timeout: float = 60.0,
    env: Env | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion inside the namespace; return its exit code and output (text).

    On timeout (or if the caller is interrupted) the whole process group is killed first.
    `args` of the result is `argv` as given, without the nsenter prefix.
    """
    popen = subprocess.Popen(
        netns_argv(netns_path, argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=child_env(env),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(popen.pid, signal.SIGKILL)
        stdout, stderr = _drain(popen)
        raise CommandTimeout(where, argv, timeout, stdout, stderr) from None
    except BaseException:
        signal_group(popen.pid, signal.SIGKILL)
        _drain(popen)
        raise
    result = subprocess.CompletedProcess(list(argv), popen.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise CommandFailed(where, result)
    return result


def _drain(popen: subprocess.Popen[str]) -> tuple[str, str]:
    """Collect what a killed process left in its pipes (bounded: a descendant may hold them open)."""
    try:
        stdout, stderr = popen.communicate(timeout=5.0)
    except subprocess.TimeoutExpired:
        for stream in (popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()
        popen.wait(timeout=5.0)
        return "", ""
    return stdout or "", stderr or ""


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain anything, so split after its last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


class LabProcess:
    """A long-running program in a lab namespace: pid, log files, exit status, signals, restart.

    The program runs in its own process group (pgid == pid); `kill` and `stop` reach its children
    too. Output goes to `<logdir>/<name>.<incarnation>.stdout|stderr`, one pair per (re)start, so the
    logs of a crashed run survive its restart.
    """

    def __init__(
        self,
        *,
        netns_path: str,
        where: str,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        env: Env | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("empty command line")
        self.name = name
        self.argv: tuple[str, ...] = tuple(argv)
        self.where = where  # e.g. "wn1a2b3c h1"; used in messages
        self.incarnation = 0
        self._netns_path = netns_path
        self._logdir = logdir
        self._env = dict(env or {})
        self._cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        if self._popen is None:
            return f"<LabProcess {self.where}/{self.name} not started>"
        return f"<LabProcess {self.where}/{self.name} pid={self._popen.pid} {_describe_exit(self.returncode)}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LabProcess:
        """Start the program (again). Refuses if it is still running: use restart()."""
        if self._popen is not None and self._popen.poll() is None:
            raise RuntimeError(f"{self!r} is still running; use restart() to run it again")
        self.incarnation += 1
        self._logdir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self._popen = subprocess.Popen(
                netns_argv(self._netns_path, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=child_env(self._env, unbuffered=True),
                cwd=self._cwd,
                start_new_session=True,
            )
        self._wait_entered()
        return self

    def _wait_entered(self) -> None:
        """Wait until the new process has entered its namespace (nsenter runs in ours at first),
        so that once start() returns, the program is found among the namespace's processes."""
        target = os.stat(self._netns_path)
        pid = self.pid

        def entered() -> bool:
            if self.returncode is not None:
                return True
            try:
                current = os.stat(f"/proc/{pid}/ns/net")
            except FileNotFoundError:
                return True
            return (current.st_dev, current.st_ino) == (target.st_dev, target.st_ino)

        wait_until(entered, timeout=30.0, interval=0.002, message=f"{self!r} to enter {self._netns_path}")

    def restart(self, *, timeout: float = 10.0) -> LabProcess:
        """stop() (if running), then start the same command line with the same env and cwd."""
        self.stop(timeout=timeout)
        return self.start()

    def kill(self, sig: int = signal.SIGTERM, *, group: bool = True) -> None:
        """Send `sig` to the process group (or only to the program with group=False)."""
        popen = self._require_started()
        if group:
            signal_group(popen.pid, sig)
        elif popen.poll() is None:
            popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the program to exit; return its exit status (negative: killed by that signal)."""
        popen = self._require_started()
        try:
            return popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabTimeout(f"{self!r} still running after {timeout:g}s") from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """End the program and its group: SIGTERM, wait up to `timeout`, then SIGKILL.

        Returns the program's exit status (None if it was never started).
        """
        if self._popen is None:
            return None
        self.begin_stop()
        return self.finish_stop(Deadline(timeout))

    def begin_stop(self) -> None:
        """First half of stop(): ask the group to end (lets a caller stop many at once)."""
        if self._popen is not None:
            signal_group(self._popen.pid, signal.SIGTERM)

    def finish_stop(self, deadline: Deadline) -> int | None:
        """Second half of stop(): wait until `deadline`, then SIGKILL whatever is left of the group."""
        popen = self._popen
        if popen is None:
            return None
        pgid = popen.pid
        try:
            popen.wait(timeout=deadline.remaining())
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            popen.wait(timeout=10.0)
        # Children may outlive the program; give them the rest of the budget, then kill them.
        try:
            wait_until(lambda: not group_members(pgid), timeout=deadline.remaining(), interval=0.02)
        except LabTimeout:
            signal_group(pgid, signal.SIGKILL)
            wait_until(
                lambda: not group_members(pgid),
                timeout=10.0,
                interval=0.02,
                message=f"process group {pgid} of {self!r} to die after SIGKILL",
            )
        return popen.returncode

    # -- state -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Pid of the current incarnation (also its process group id)."""
        return self._require_started().pid

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running (negative: killed by that signal, like Popen)."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def exit_signal(self) -> signal.Signals | None:
        """The signal that ended the program, if a signal did."""
        code = self.returncode
        return signal.Signals(-code) if code is not None and code < 0 else None

    # -- output ------------------------------------------------------------------------------

    @property
    def stdout_path(self) -> Path:
        return self._logdir / f"{self.name}.{self.incarnation}.stdout"

    @property
    def stderr_path(self) -> Path:
        return self._logdir / f"{self.name}.{self.incarnation}.stderr"

    def stdout(self) -> str:
        """Everything the current incarnation wrote to stdout so far."""
        return _read(self.stdout_path)

    def stderr(self) -> str:
        """Everything the current incarnation wrote to stderr so far."""
        return _read(self.stderr_path)

    def wait_for_output(
        self, pattern: str | re.Pattern[str], *, stream: str = "both", timeout: float = 30.0
    ) -> re.Match[str]:
        """Wait until `pattern` (a regex) appears in the output; fail early if the program exits."""
        if stream not in ("stdout", "stderr", "both"):
            raise ValueError(f"stream must be stdout, stderr or both, not {stream!r}")
        regex = re.compile(pattern)

        def search() -> re.Match[str] | None:
            exited = self.returncode is not None
            text = "" if stream == "stderr" else self.stdout()
            text += "" if stream == "stdout" else self.stderr()
            if (found := regex.search(text)) is None and exited:
                raise RuntimeError(f"{self!r} exited before printing {regex.pattern!r}{_tail(self.stderr())}")
            return found

        return wait_until(
            search,
            timeout=timeout,
            interval=0.05,
            message=lambda: f"{regex.pattern!r} in the {stream} of {self!r}{_tail(self.stderr())}",
        )

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._popen


def stop_all(processes: Sequence[LabProcess], *, timeout: float = 10.0) -> None:
    """Stop many programs under one deadline: signal them all first, then wait for each."""
    for process in processes:
        process.begin_stop()
    deadline = Deadline(timeout)
    for process in processes:
        process.finish_stop(deadline)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


def _shell_line(argv: object) -> str:
    if isinstance(argv, (list, tuple)):
        return " ".join(str(part) for part in argv)
    return str(argv)


def _tail(text: str | None, lines: int = 15) -> str:
    if not text or not text.strip():
        return ""
    kept = text.rstrip().splitlines()[-lines:]
    return "\n  | " + "\n  | ".join(kept)
