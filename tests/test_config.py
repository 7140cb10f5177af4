"""Settings from flags and environment: precedence, validation, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from weavenet.config import (
    ConfigError,
    HttpAddress,
    IpallocInit,
    OneLineErrorParser,
    PeerAddress,
    add_launch_arguments,
    settings_from,
)
from weavenet.mesh.peer_name import PeerName


def parse(argv: list[str], env: dict[str, str] | None = None):
    parser = OneLineErrorParser(prog="weavenet launch")
    add_launch_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_defaults_are_weave_nets():
    settings = parse(["--state-dir", "/tmp/x"])
    assert settings.port == 6783
    assert settings.http_addr == HttpAddress("127.0.0.1", 6784)
    assert settings.ipalloc_range == IPv4Network("10.32.0.0/12")
    assert settings.default_subnet == IPv4Network("10.32.0.0/12")
    assert settings.conn_limit == 200
    assert settings.discovery is True
    assert settings.password is None and not settings.encrypted
    assert settings.ipalloc_init == IpallocInit("consensus")


def test_flag_beats_environment_which_beats_default():
    env = {"WEAVE_PORT": "7000", "CONN_LIMIT": "5", "WEAVE_PASSWORD": "s3cret"}
    settings = parse(["--port", "7100", "--state-dir", "/tmp/x"], env)
    assert settings.port == 7100
    assert settings.conn_limit == 5
    assert settings.password == "s3cret" and settings.encrypted


def test_password_is_never_in_the_repr():
    settings = parse(["--password", "hunter2", "--state-dir", "/tmp/x"])
    assert "hunter2" not in repr(settings)


def test_peers_with_and_without_ports():
    settings = parse(["10.0.0.1", "host-b:7000", "10.0.0.3,10.0.0.4", "--state-dir", "/tmp/x"])
    assert settings.peers == (
        PeerAddress("10.0.0.1", 6783),
        PeerAddress("host-b", 7000),
        PeerAddress("10.0.0.3", 6783),
        PeerAddress("10.0.0.4", 6783),
    )


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["--ipalloc-range", "10.0.0/33"], {}, "--ipalloc-range: invalid CIDR '10.0.0/33'"),
        (["--ipalloc-range", "10.32.0.1/12"], {}, "has host bits set (did you mean 10.32.0.0/12?)"),
        ([], {"IPALLOC_RANGE": "banana"}, "--ipalloc-range (from $IPALLOC_RANGE): invalid CIDR"),
        (["--port", "70000"], {}, "--port: expected a port number 1-65535, got 70000"),
        (["--mtu", "100"], {}, "--mtu: expected an MTU between 576 and 65535"),
        (["--ipalloc-init", "consensus=zero"], {}, "--ipalloc-init: consensus=N needs a positive integer"),
        (["--ipalloc-init", "sneed"], {}, "--ipalloc-init: expected consensus[=N], seed=NAME,... or observer"),
        (["--name", "zz:00:00:00:00:01"], {}, "--name: invalid peer name"),
        (["--log-level", "loud"], {}, "--log-level: expected one of debug, info, warning, error"),
        (["--trusted-subnets", "10.0.0.0/8,nope"], {}, "--trusted-subnets: invalid CIDR 'nope'"),
        (["--ipalloc-default-subnet", "10.0.0.0/24"], {}, "is not inside the allocation range 10.32.0.0/12"),
        (["bad peer/x"], {}, "PEER: invalid peer address"),
    ],
)
def test_bad_values_name_the_flag(argv, env, fragment):
    with pytest.raises(ConfigError) as info:
        parse([*argv, "--state-dir", "/tmp/x"], env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_ipalloc_init_forms():
    assert IpallocInit.parse("consensus=3") == IpallocInit("consensus", quorum=3)
    seeds = IpallocInit.parse("seed=::1,::2")
    assert seeds.mode == "seed" and seeds.seeds == (PeerName(1), PeerName(2))
    assert IpallocInit.parse("observer").mode == "observer"


def test_empty_range_disables_ipam():
    assert parse(["--ipalloc-range", "", "--state-dir", "/tmp/x"]).ipalloc_range is None


def test_peer_name_shorthand_and_round_trip():
    assert PeerName.parse("::1") == 1
    assert str(PeerName.parse("aa:bb:cc:dd:ee:ff")) == "aa:bb:cc:dd:ee:ff"
    name = PeerName.random()
    assert PeerName.parse(str(name)) == name
    assert int(name) >> 40 & 0x02  # locally administered
    with pytest.raises(ValueError):
        PeerName.parse("00:00:00:00:00:00")


def test_state_dir_defaults_per_network_namespace():
    settings = parse([])
    assert isinstance(settings.state_dir, Path)
    assert str(settings.state_dir).startswith("/var/lib/weavenet")


def test_cli_reports_a_bad_flag_in_one_line_with_exit_code_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "weavenet", "launch", "--state-dir", str(tmp_path), "--ipalloc-range", "10.0.0/33"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "weavenet: launch: --ipalloc-range: invalid CIDR '10.0.0/33' (expected e.g. 10.32.0.0/12)"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "weavenet.pid").exists()


def test_cli_unknown_flag_is_one_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "weavenet", "status", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
