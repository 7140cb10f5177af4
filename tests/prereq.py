"""What a test needs from the machine, and what happens when it is missing.

Locally a missing prerequisite skips the test with a message naming it; in CI (`CI=true`) the same
message fails the test instead, so a CI run can never pass by skipping what it was meant to test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from functools import cache

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip (locally) or fail (in CI) the running test because `what` is missing."""
    message = f"missing prerequisite: {what}"
    if in_ci():
        pytest.fail(message + " (CI=true: prerequisites are required, not optional)", pytrace=False)
    pytest.skip(message)


@cache
def _root_and_netns() -> str | None:
    if os.geteuid() != 0:
        return "root (lab tests create network namespaces; run as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (Debian package iproute2)"
    # A random name: pids repeat across runs and machines, and a probe left behind by one must not
    # make `ip netns add` fail (and every lab test with it) in the next.
    probe = f"wnprobe-{secrets.token_hex(6)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces (ip netns add failed: {made.stderr.strip()})"
    deleted = subprocess.run(["ip", "netns", "delete", probe], capture_output=True, text=True)
    if deleted.returncode != 0:
        return f"network namespaces that can be removed (ip netns delete {probe} failed: {deleted.stderr.strip()})"
    return None


@cache
def _docker() -> str | None:
    if not os.path.exists("/var/run/docker.sock"):
        return "the Docker daemon (no /var/run/docker.sock)"
    if shutil.which("docker") is None:
        return "the docker client on PATH"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"a running Docker daemon (docker info: {info.stderr.strip()})"
    return None


def require_lab() -> None:
    if (problem := _root_and_netns()) is not None:
        missing(problem)


def require_docker() -> None:
    if (problem := _docker()) is not None:
        missing(problem)


def require_command(name: str, package: str) -> None:
    if shutil.which(name) is None:
        missing(f"the `{name}` command (Debian package {package})")
