"""The multi-host lab itself (tests/lab/): hosts on a switch, faults, programs, containers, cleanup.

Every later multi-host test trusts the lab, so these scenarios check what a test author relies on:
that hosts really reach each other, that a cut really stops TCP and UDP (and only between the two
hosts), that programs can be killed and restarted, and that nothing outlives a lab, not even when
the test fails, the run is interrupted, or the process running it is killed outright.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab import (
    CommandFailed,
    CommandTimeout,
    IperfError,
    Lab,
    LabTimeout,
    Namespace,
    parse_iperf3_json,
    wait_until,
)
from tests.lab.firewall import render
from tests.lab.process import group_members
from tests.lab.sweep import LOCK_DIR, NETNS_PATTERN, lab_namespaces, owner_alive, pids_in_namespaces
from tests.prereq import require_command

REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------


def lab_netns(lab_id: str) -> list[str]:
    """Names in /run/netns that belong to lab `lab_id`."""
    return lab_namespaces().get(lab_id, [])


def gone(pid: int) -> bool:
    """The process no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def udp_arrives(sender: Namespace, receiver: socket.socket, address: str, port: int, *, timeout: float) -> bool:
    """Send one datagram from namespace `sender` to address:port; whether `receiver` gets it in time."""
    payload = os.urandom(8).hex().encode()
    with sender.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.sendto(payload, (address, port))
    receiver.settimeout(timeout)
    try:
        while True:
            if receiver.recv(64) == payload:
                return True
    except TimeoutError:
        return False


def python_child(script: str, *args: str) -> subprocess.Popen[str]:
    """A separate Python process with the repository importable (to abort a lab for real)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def inner_pytest(tmp_path: Path, test_source: str) -> tuple[list[str], dict[str, str]]:
    """Write a one-file pytest project using the lab fixtures; return (command line, environment)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lab: needs root and namespaces\n")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.lab.fixtures"]\n')
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_source))
    env = {**os.environ, "PYTHONPATH": str(REPO), "WN_STATE": str(tmp_path / "state.json")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    return [*command, str(tmp_path / "test_inner.py")], env


def read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# -- plain unit tests: no root needed ---------------------------------------------------------------


def test_wait_until_returns_the_value_or_says_what_it_waited_for() -> None:
    calls = iter([0, None, "ready"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "ready"

    with pytest.raises(LabTimeout, match=r"timed out after 0.1s waiting for: the moon \[\d+ checks\]"):
        wait_until(lambda: False, timeout=0.1, interval=0.01, message="the moon")

    def flaky() -> bool:
        raise ConnectionRefusedError("not yet")

    with pytest.raises(LabTimeout, match="last error: ConnectionRefusedError: not yet"):
        wait_until(flaky, timeout=0.05, interval=0.01, ignore=(ConnectionRefusedError,))
    with pytest.raises(ConnectionRefusedError):
        wait_until(flaky, timeout=1)


def test_switch_rules_cut_port_pairs_both_ways_and_isolate_ports() -> None:
    rules = render([("h1", "h2"), ("h2", "h1"), ("h3", "h1")], isolated=[])
    assert rules.startswith("add table bridge wnlab\ndelete table bridge wnlab\n")
    assert 'elements = { "h1" . "h2", "h1" . "h3", "h2" . "h1", "h3" . "h1" }' in rules
    assert "iifname . oifname @cut_pairs counter drop" in rules
    assert rules.count("elements") == 1

    isolated = render([], isolated=["h4", "h4"])
    assert 'elements = { "h4" }' in isolated
    assert "iifname @isolated counter drop" in isolated and "oifname @isolated counter drop" in isolated
    with pytest.raises(ValueError, match="bad interface name"):
        render([("h1", "a-very-long-port-name")], isolated=[])


def test_iperf3_reports_are_read_into_numbers_or_errors() -> None:
    tcp = {
        "start": {"test_start": {"protocol": "TCP"}},
        "end": {
            "sum_sent": {"seconds": 1.0, "bytes": 10, "bits_per_second": 2.5e9, "retransmits": 3},
            "sum_received": {"seconds": 1.01, "bytes": 9, "bits_per_second": 2.0e9},
        },
    }
    result = parse_iperf3_json(json.dumps(tcp))
    assert (result.protocol, result.gbits_per_second, result.sent_gbps) == ("tcp", 2.0, 2.5)
    assert (result.retransmits, result.lost_percent) == (3, None)

    udp = {
        "start": {"test_start": {"protocol": "UDP"}},
        "end": {"sum": {"seconds": 1.0, "bytes": 5, "bits_per_second": 1e8, "jitter_ms": 0.1, "lost_percent": 2}},
    }
    result = parse_iperf3_json(json.dumps(udp))
    assert (result.protocol, result.gbits_per_second, result.lost_percent) == ("udp", 0.1, 2.0)
    assert result.retransmits is None

    with pytest.raises(IperfError, match="unable to connect to server"):
        parse_iperf3_json('{"start": {}, "error": "unable to connect to server: Connection refused"}')
    with pytest.raises(IperfError, match="no JSON report"):
        parse_iperf3_json("")


# -- the underlay ---------------------------------------------------------------------------------


@pytest.mark.lab
def test_hosts_reach_each_other_across_the_switch(lab: Lab) -> None:
    assert [host.label for host in lab.hosts] == ["h1", "h2", "h3"]
    assert NETNS_PATTERN.fullmatch(lab.host("h1").name)
    assert sorted(lab_netns(lab.id)) == sorted(ns.name for ns in lab.namespaces())
    assert lab.switch.links() == ["lo", "br0", "h1", "h2", "h3"]
    for host in lab.hosts:
        assert host.links() == ["lo", "eth0"]
        assert host.addresses("eth0") == [f"{host.address}/24"]
        assert host.address in {str(address) for address in lab.subnet.hosts()}
        assert host.addresses("lo") == ["127.0.0.1/8"]
    for a in lab.hosts:
        for b in lab.hosts:
            if a is not b:
                a.wait_reachable(b)


@pytest.mark.lab(hosts=2, mtu=1400)
def test_the_underlay_mtu_is_what_the_lab_asked_for(lab: Lab) -> None:
    h1, h2 = lab.hosts
    with h1.iproute() as ipr:
        assert ipr.link("get", index=ipr.link_lookup(ifname="eth0")[0])[0].get("mtu") == 1400
    h1.wait_reachable(h2)
    assert h1.run(["ping", "-c1", "-W5", "-M", "do", "-s", "1372", h2.address]).returncode == 0
    too_big = h1.run(["ping", "-c1", "-W1", "-M", "do", "-s", "1373", h2.address], check=False)
    assert too_big.returncode != 0


@pytest.mark.lab
def test_hosts_can_be_added_to_a_running_lab(lab: Lab) -> None:
    h4 = lab.add_host()
    assert (h4.label, h4.address) == ("h4", str(lab.subnet.network_address + 4))
    h4.wait_reachable(lab.host("h1"))
    with pytest.raises(ValueError, match="already has a host"):
        lab.add_host("h4")


# -- faults ---------------------------------------------------------------------------------------


@pytest.mark.lab
def test_a_cut_stops_tcp_udp_and_ping_between_two_hosts_only_until_healed(lab: Lab) -> None:
    h1, h2, h3 = lab.hosts
    port = 7000
    with h2.socket() as listener, h2.socket(socket.AF_INET, socket.SOCK_DGRAM) as inbox:
        listener.bind((h2.address, port))
        listener.listen(8)
        inbox.bind((h2.address, port))
        # An established connection from before the cut: its data must wait for the heal.
        talker = h1.socket()
        talker.settimeout(10)
        talker.connect((h2.address, port))
        accepted, _ = listener.accept()
        with talker, accepted:
            assert h1.tcp_connect(h2, port, timeout=10) and h3.tcp_connect(h2, port, timeout=10)
            assert wait_until(
                lambda: udp_arrives(h1, inbox, h2.address, port, timeout=1),
                timeout=20,
                message="a datagram from h1 to reach h2 before the cut",
            )

            lab.cut(h1, h2)
            lab.cut(h2, h1)  # idempotent, either order
            assert lab.is_cut(h1, h2) and not lab.is_cut(h1, h3)
            assert not h1.ping(h2, timeout=0.5) and not h2.ping(h1, timeout=0.5)
            assert not h1.tcp_connect(h2, port, timeout=0.5)
            assert not udp_arrives(h1, inbox, h2.address, port, timeout=0.5)
            talker.sendall(b"sent during the cut")
            accepted.settimeout(0.5)
            with pytest.raises(TimeoutError):
                accepted.recv(64)
            # The third host still reaches both, and the underlay links stayed up.
            h3.wait_reachable(h1)
            h3.wait_reachable(h2)
            assert h3.tcp_connect(h2, port, timeout=5)
            with h1.iproute() as ipr:
                assert ipr.link("get", index=ipr.link_lookup(ifname="eth0")[0])[0].get("operstate") == "UP"

            lab.heal(h1, h2)
            lab.heal(h1, h2)  # idempotent
            assert not lab.is_cut(h1, h2)
            h1.wait_reachable(h2)
            h2.wait_reachable(h1)
            assert wait_until(
                lambda: h1.tcp_connect(h2, port, timeout=1), timeout=30, message="h1 to connect to h2 after the heal"
            )
            assert wait_until(
                lambda: udp_arrives(h1, inbox, h2.address, port, timeout=1),
                timeout=20,
                message="a datagram from h1 to reach h2 after the heal",
            )
            accepted.settimeout(30)
            assert accepted.recv(64) == b"sent during the cut"  # TCP retransmitted it after the heal


@pytest.mark.lab
def test_an_isolated_host_reaches_nobody_until_it_rejoins_and_cuts_survive_that(lab: Lab) -> None:
    h1, h2, h3 = lab.hosts
    lab.cut(h1, h3)
    lab.isolate(h3)
    lab.isolate("h3")  # idempotent, by name too
    assert not h3.ping(h1, timeout=0.5) and not h3.ping(h2, timeout=0.5)
    assert not h2.ping(h3, timeout=0.5)
    h1.wait_reachable(h2)
    assert lab.is_isolated(h3) and not lab.is_isolated(h1)

    lab.rejoin(h3)
    lab.rejoin(h3)  # idempotent
    h3.wait_reachable(h2)
    h2.wait_reachable(h3)
    assert not h3.ping(h1, timeout=0.5), "rejoin must not heal an explicit cut"
    lab.heal_all()
    h3.wait_reachable(h1)


# -- programs in hosts ----------------------------------------------------------------------------


@pytest.mark.lab(hosts=2)
def test_a_killed_server_shows_its_signal_and_restarts_with_a_new_pid(lab: Lab) -> None:
    h1, h2 = lab.hosts
    port = 8080
    server = h2.start([sys.executable, "-m", "http.server", "--bind", h2.address, str(port)], name="web")
    h2.wait_listening(port)
    assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == h2.inode
    assert h1.tcp_connect(h2, port, timeout=5)
    assert h1.run(["python3", "-c", f"import urllib.request; urllib.request.urlopen('http://{h2.address}:{port}/')"])
    server.wait_for_output(r'"GET / HTTP/1.1" 200', stream="stderr")

    first_pid = server.pid
    server.kill(signal.SIGKILL)
    assert server.wait(timeout=30) == -signal.SIGKILL
    assert server.exit_signal == signal.SIGKILL and not server.running
    assert not h1.tcp_connect(h2, port, timeout=5)  # refused: nobody listens any more

    server.restart()
    assert server.pid != first_pid and server.incarnation == 2 and server.running
    h2.wait_listening(port)
    assert h1.tcp_connect(h2, port, timeout=5)
    assert server.stdout_path.name == "web.2.stdout"
    assert (server.stdout_path.parent / "web.1.stderr").read_text().count("GET /") == 1
    assert server.stop() == -signal.SIGTERM


@pytest.mark.lab(hosts=1)
def test_stopping_a_program_ends_its_children_too(lab: Lab) -> None:
    (h1,) = lab.hosts
    shell = h1.start(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    assert wait_until(
        lambda: len(group_members(shell.pid)) == 3, timeout=30, message="the shell and its two sleeps to be running"
    )
    children = [pid for pid in group_members(shell.pid) if pid != shell.pid]
    shell.stop(timeout=10)
    assert group_members(shell.pid) == []
    assert all(gone(pid) for pid in children)
    with pytest.raises(ValueError, match="already has a process named 'sh'"):
        h1.start(["true"], name="sh")
    assert h1.start(["sh", "-c", "exit 3"]).wait(timeout=30) == 3  # automatic name "sh-2"
    assert h1.process("sh-2").returncode == 3


@pytest.mark.lab(hosts=1)
def test_run_gives_output_and_fails_loudly(lab: Lab, tmp_path: Path) -> None:
    (h1,) = lab.hosts
    result = h1.run(["sh", "-c", 'echo "$WN_GREETING"; pwd; cat'], env={"WN_GREETING": "hi"}, cwd=tmp_path, input="in")
    assert result.stdout.splitlines() == ["hi", str(tmp_path), "in"]
    assert result.args == ["sh", "-c", 'echo "$WN_GREETING"; pwd; cat']
    assert h1.run(["sh", "-c", 'test -z "${HOME+set}"'], env={"HOME": None}).returncode == 0

    with pytest.raises(CommandFailed, match=r"h1: exited 2: .*\n  \| nope") as failure:
        h1.run(["sh", "-c", "echo nope >&2; exit 2"])
    assert failure.value.returncode == 2 and failure.value.stderr == "nope\n"
    assert h1.run(["false"], check=False).returncode == 1

    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"still running after 0\.5s"):
        h1.run(["sh", "-c", "sleep 60 & sleep 60"], timeout=0.5)
    assert time.monotonic() - started < 15, "a timed-out command's whole group must be killed"


# -- containers -----------------------------------------------------------------------------------


@pytest.mark.lab(hosts=1)
def test_a_container_is_its_own_namespace_with_only_loopback(lab: Lab) -> None:
    (h1,) = lab.hosts
    c1 = h1.add_container("c1")
    assert c1.name == f"{lab.id}-h1-c1" and h1.container("c1") is c1
    assert c1.run(["readlink", "/proc/self/ns/net"]).stdout.strip() == f"net:[{c1.inode}]"
    assert c1.inode not in (h1.inode, os.stat("/proc/self/ns/net").st_ino)
    assert c1.links() == ["lo"]
    assert c1.run(["ping", "-c1", "-W5", "127.0.0.1"]).returncode == 0
    sleeper = c1.start(["sleep", "300"])
    assert sleeper.pid in c1.pids()


@pytest.mark.lab(hosts=1)
def test_veths_connect_containers_to_a_bridge_on_their_host(lab: Lab) -> None:
    (h1,) = lab.hosts
    c1, c2 = h1.add_container("c1"), h1.add_container("c2")
    h1.add_bridge("weave", mtu=1376)
    h1.add_address("weave", "10.32.0.1/12")
    pair = h1.add_veth_to(c1, "vethwl1", "ethwe0", bridge="weave", mtu=1376)
    h1.add_veth_to(c2, "vethwl2", "ethwe0", bridge="weave", mtu=1376)
    c1.add_address("ethwe0", "10.32.0.2/12")
    c2.add_address("ethwe0", "10.32.0.3/12")
    assert (pair.local, pair.peer, pair.peer_ns) == ("vethwl1", "ethwe0", c1)
    assert c1.links() == ["lo", "ethwe0"]
    c1.wait_reachable("10.32.0.1")
    h1.wait_reachable("10.32.0.2")
    c1.wait_reachable("10.32.0.3")  # containers on one bridge reach each other


# -- measuring ------------------------------------------------------------------------------------


@pytest.mark.lab(hosts=2)
def test_iperf3_between_two_hosts_reports_throughput(lab: Lab) -> None:
    require_command("iperf3", "iperf3")
    h1, h2 = lab.hosts
    result = lab.iperf3(h2, h1, seconds=1)
    assert result.protocol == "tcp" and result.gbits_per_second > 0, result.describe()
    assert result.received_bytes > 0 and isinstance(result.retransmits, int)
    assert 5201 not in h2.listening_ports(), "the iperf3 server must be gone"
    assert all(not process.running for process in h2.processes)

    lab.cut(h1, h2)
    with pytest.raises(IperfError, match=r"h1 -> .*h2"):
        lab.iperf3(h2, h1, seconds=1, connect_timeout=1)


# -- cleanup --------------------------------------------------------------------------------------


@pytest.mark.lab
def test_a_with_block_removes_its_lab_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(hosts=2) as lab:
        sleeper = lab.host("h1").start(["sleep", "300"])
        lab.host("h2").add_container("c1")
        workdir = lab.workdir
        assert len(lab_netns(lab.id)) == 4
        raise RuntimeError("boom")
    assert lab.closed and lab_netns(lab.id) == []
    assert sleeper.exit_signal == signal.SIGTERM
    assert not workdir.exists() and not (LOCK_DIR / f"{lab.id}.lock").exists()


@pytest.mark.lab(hosts=1)
def test_the_sweeper_removes_an_aborted_lab_and_leaves_live_labs_alone(lab: Lab) -> None:
    aborted = python_child(
        """
        import json, os, signal
        from tests.lab import Lab
        lab = Lab(hosts=2).start()
        sleeper = lab.host("h1").start(["sleep", "300"])
        # A daemon that left its process group, as real daemons do.
        lab.host("h2").run(["sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 &"])
        lab.host("h2").add_container("c1")
        print(json.dumps({"id": lab.id, "workdir": str(lab.workdir)}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all
        """
    )
    stdout, stderr = aborted.communicate(timeout=60)
    assert aborted.returncode == -signal.SIGKILL, stderr
    leftover = json.loads(stdout)
    names = lab_netns(leftover["id"])
    assert len(names) == 4 and not owner_alive(leftover["id"])
    pids = [pid for found in pids_in_namespaces([f"/run/netns/{name}" for name in names]).values() for pid in found]
    assert len(pids) == 2 and Path(leftover["workdir"]).is_dir()

    swept = subprocess.run(
        [sys.executable, "-m", "tests.lab", "--cleanup"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert leftover["id"] in swept.stdout and lab.id in swept.stdout  # swept, and left alone
    assert lab_netns(leftover["id"]) == []
    assert wait_until(lambda: all(gone(pid) for pid in pids), timeout=30, message=f"swept pids {pids} to die")
    assert not Path(leftover["workdir"]).exists()
    assert not (LOCK_DIR / f"{leftover['id']}.lock").exists()

    assert sorted(lab_netns(lab.id)) == sorted(ns.name for ns in lab.namespaces())
    assert owner_alive(lab.id)
    listing = subprocess.run([sys.executable, "-m", "tests.lab", "--list"], capture_output=True, text=True, cwd=REPO)
    assert f"{lab.id} live" in listing.stdout


@pytest.mark.lab
def test_fixture_teardown_removes_everything_when_the_test_fails(tmp_path: Path) -> None:
    command, env = inner_pytest(
        tmp_path,
        """
        import json, os
        import pytest

        @pytest.mark.lab(hosts=2)
        def test_fails(lab):
            sleeper = lab.host("h1").start(["sleep", "300"])
            lab.host("h2").add_container("c1")
            lab.cut("h1", "h2")
            with open(os.environ["WN_STATE"], "w") as state:
                json.dump({"id": lab.id, "pid": sleeper.pid}, state)
            raise RuntimeError("deliberate failure")
        """,
    )
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "deliberate failure" in run.stdout
    state = read_state(tmp_path / "state.json")
    assert f"lab {state['id']}" in run.stdout and "cut from" in run.stdout  # the lab's state in the report
    assert lab_netns(str(state["id"])) == [] and gone(int(state["pid"]))
    assert not (LOCK_DIR / f"{state['id']}.lock").exists()


@pytest.mark.lab
def test_sigterm_to_a_running_test_still_removes_its_lab(tmp_path: Path) -> None:
    command, env = inner_pytest(
        tmp_path,
        """
        import json, os
        from tests.lab import wait_until

        def test_waits_forever(lab):
            sleeper = lab.host("h1").start(["sleep", "300"])
            with open(os.environ["WN_STATE"] + ".tmp", "w") as state:
                json.dump({"id": lab.id, "pid": sleeper.pid}, state)
            os.rename(os.environ["WN_STATE"] + ".tmp", os.environ["WN_STATE"])
            wait_until(lambda: False, timeout=120, message="a SIGTERM")
        """,
    )
    inner = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path
    )
    try:
        state_file = tmp_path / "state.json"
        wait_until(state_file.exists, timeout=60, message=lambda: f"the inner test to start a lab ({inner.poll()=})")
        state = read_state(state_file)
        assert lab_netns(str(state["id"]))
        inner.send_signal(signal.SIGTERM)
        output, _ = inner.communicate(timeout=60)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.communicate()
    assert inner.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "SIGTERM" in output
    assert lab_netns(str(state["id"])) == [] and gone(int(state["pid"]))
