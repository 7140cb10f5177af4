"""`weavenet demo`, the README's main job: it must work on this machine and leave nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.prereq import require_command

pytestmark = pytest.mark.lab


def demo_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith("wndemo")]


def run_demo(*args: str) -> str:
    require_command("iperf3", "iperf3")
    result = subprocess.run(
        [sys.executable, "-m", "weavenet", "demo", "--seconds", "1", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert len(re.findall(r"^=== ping .*: ok$", out, re.MULTILINE)) == 2, out
    # Only this demo's namespaces count: another demo on the machine may come and go meanwhile.
    named = re.search(r"\(namespaces (wndemo[0-9a-f]+)-\*\)$", out, re.MULTILINE)
    assert named is not None, out
    left = [name for name in demo_namespaces() if name.startswith(named.group(1) + "-")]
    assert left == [], f"the demo left namespaces behind: {left}"
    return out


def connection_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("-> ", "<- "))]


def test_the_demo_shows_an_encrypted_mesh_working_and_cleans_up():
    out = run_demo()
    assert "Encryption: enabled" in out
    assert out.count("established encrypted") == 2, out
    lines = connection_lines(out)
    assert len(lines) == 2 and all(" sleeve " in line and line.endswith("(encrypted)") for line in lines), lines
    throughput = re.search(r"^([0-9.]+) Gbit/s \(encrypted\)$", out, re.MULTILINE)
    assert throughput is not None and float(throughput.group(1)) > 0, out


def test_the_plain_demo_carries_its_containers_on_the_kernel_path():
    out = run_demo("--no-password")
    assert "Encryption: disabled" in out
    lines = connection_lines(out)
    assert len(lines) == 2 and all(" fastdp " in line for line in lines), lines
    assert re.search(r"^ *FastPath: kernel VXLAN on UDP 6784 \(vxlan-6784\), peers: 2 fastdp$", out, re.MULTILINE), out
    throughput = re.search(r"^([0-9.]+) Gbit/s \(plain\)$", out, re.MULTILINE)
    assert throughput is not None and float(throughput.group(1)) > 0, out
