"""The plugin's launch settings: defaults, flags over environment, validation, when it is on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_config import parse
from weavenet.config import ConfigError
from weavenet.plugin import server
from weavenet.plugin.server import plugin_dir


def test_defaults_are_weave_nets_names():
    settings = parse(["--state-dir", "/tmp/x"])
    assert settings.plugin is True
    assert settings.plugin_dir is None  # → /run/docker/plugins when it exists (and we are on the host)
    assert (settings.plugin_mesh_name, settings.plugin_name, settings.plugin_network) == ("weavemesh", "weave", "weave")
    assert settings.docker_api == "/var/run/docker.sock"


def test_flags_beat_environment():
    env = {
        "WEAVE_PLUGIN_DIR": "/run/env-plugins",
        "WEAVE_PLUGIN_MESH_NAME": "envmesh",
        "WEAVE_PLUGIN_NETWORK": "envnet",
        "WEAVE_DOCKER_API": "unix:///run/other-docker.sock",
    }
    settings = parse(["--state-dir", "/tmp/x", "--plugin-dir", "/tmp/p", "--plugin-mesh-name", "m2"], env)
    assert settings.plugin_dir == Path("/tmp/p")
    assert settings.plugin_mesh_name == "m2"
    assert settings.plugin_network == "envnet"
    assert settings.docker_api == "/run/other-docker.sock"


def test_no_plugin_from_flag_or_environment():
    assert parse(["--state-dir", "/tmp/x", "--no-plugin"]).plugin is False
    assert parse(["--state-dir", "/tmp/x"], {"WEAVE_NO_PLUGIN": "true"}).plugin is False
    assert parse(["--state-dir", "/tmp/x"], {"WEAVE_NO_PLUGIN": "0"}).plugin is True
    with pytest.raises(ConfigError, match=r"^--no-plugin \(from \$WEAVE_NO_PLUGIN\): expected a boolean"):
        parse(["--state-dir", "/tmp/x"], {"WEAVE_NO_PLUGIN": "sometimes"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--plugin-mesh-name", "bad/name"], "--plugin-mesh-name: expected a name of letters"),
        (["--plugin-network=-lead"], "--plugin-network: expected a name of letters"),
        (["--docker-api", "tcp://1.2.3.4:2375"], "--docker-api: expected unix:///path/to/docker.sock"),
        (["--plugin-name", "same", "--plugin-mesh-name", "same"], "--plugin-name: 'same' is also the --plugin-mesh"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], message: str):
    with pytest.raises(ConfigError) as caught:
        parse(["--state-dir", "/tmp/x", *argv])
    assert str(caught.value).startswith(message)


def test_empty_values_disable_parts():
    settings = parse(
        ["--state-dir", "/tmp/x", "--plugin-name", "", "--plugin-network", "", "--docker-api", ""],
    )
    assert settings.plugin_name == "" and settings.plugin_network == "" and settings.docker_api is None


def test_the_plugin_is_on_by_default_only_beside_dockerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(server, "DEFAULT_PLUGIN_DIR", tmp_path / "absent")
    assert plugin_dir(parse(["--state-dir", "/tmp/x"])) is None  # no Docker plugin directory here
    monkeypatch.setattr(server, "DEFAULT_PLUGIN_DIR", tmp_path)
    assert plugin_dir(parse(["--state-dir", "/tmp/x", "--no-plugin"])) is None
    explicit = parse(["--state-dir", "/tmp/x", "--plugin-dir", str(tmp_path / "mine")])
    assert plugin_dir(explicit) == tmp_path / "mine"  # explicit: on, wherever we run
    off = parse(["--state-dir", "/tmp/x", "--plugin-mesh-name", "", "--plugin-name", ""])
    assert plugin_dir(off) is None
