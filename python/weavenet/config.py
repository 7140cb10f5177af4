"""Settings: the one place that reads `launch` flags and WEAVE_* environment variables.

Every value is validated once, here, into a frozen `Settings`. A bad value raises `ConfigError`
naming the flag (and the environment variable it may have come from); the CLI prints it as one
line and exits 2. Nothing in here touches the network or the disk beyond reading /proc and /run.
Precedence: a flag beats its environment variable, which beats the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Literal, TypeVar

from weavenet.mesh.peer_name import PeerName

DEFAULT_PORT = 6783
DEFAULT_HTTP_ADDR = "127.0.0.1:6784"
DEFAULT_STATE_DIR = Path("/var/lib/weavenet")
DEFAULT_IPALLOC_RANGE = "10.32.0.0/12"
DEFAULT_CONN_LIMIT = 200
DEFAULT_PLUGIN_DIR = Path("/run/docker/plugins")
DEFAULT_DOCKER_API = "/var/run/docker.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")


class ConfigError(Exception):
    """A setting has a bad value. `str()` is the one-line message users see."""

    def __init__(self, flag: str, message: str, env: str | None = None) -> None:
        source = f"{flag} (from ${env})" if env else flag
        super().__init__(f"{source}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class PeerAddress:
    """A peer to connect to: host or IP, and port (6783 unless given)."""

    host: str
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        text = text.strip()
        if not text:
            raise ValueError("empty peer address")
        host, port = text, DEFAULT_PORT
        if text.startswith("["):  # [v6]:port
            end = text.find("]")
            if end < 0:
                raise ValueError(f"invalid peer address {text!r}: missing ']'")
            host, rest = text[1:end], text[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"invalid peer address {text!r}")
                port = _parse_port(rest[1:])
        elif text.count(":") == 1:
            host, port_text = text.split(":")
            port = _parse_port(port_text)
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"invalid peer address {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP API listens: a TCP host:port, or a unix socket path (absolute)."""

    host: str = "127.0.0.1"
    port: int = 6784
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> HttpAddress:
        text = text.strip()
        if text.startswith("/"):
            return cls(unix_path=text)
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT or an absolute socket path, got {text!r}")
        host = host.strip("[]") or "127.0.0.1"
        return cls(host=host, port=_parse_port(port_text))

    def __str__(self) -> str:
        if self.unix_path:
            return self.unix_path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL for clients (unix sockets are handled by the client itself)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class IpallocInit:
    """How IPAM gets its first owner: consensus among N peers, named seeds, or observe only."""

    mode: Literal["consensus", "seed", "observer"] = "consensus"
    quorum: int | None = None  # consensus=N; None → derived from the peer list, as in Weave Net
    seeds: tuple[PeerName, ...] = ()

    @classmethod
    def parse(cls, text: str) -> IpallocInit:
        mode, sep, arg = text.strip().partition("=")
        if mode == "consensus":
            if not sep:
                return cls("consensus")
            quorum = _parse_int(arg, "consensus=N needs a positive integer N", minimum=1)
            return cls("consensus", quorum=quorum)
        if mode == "seed":
            names = [n for n in arg.split(",") if n.strip()]
            if not names:
                raise ValueError("seed= needs a comma-separated list of peer names")
            return cls("seed", seeds=tuple(PeerName.parse(n) for n in names))
        if mode == "observer" and not sep:
            return cls("observer")
        raise ValueError(f"expected consensus[=N], seed=NAME,... or observer, got {text!r}")

    def __str__(self) -> str:
        if self.mode == "consensus":
            return "consensus" if self.quorum is None else f"consensus={self.quorum}"
        if self.mode == "seed":
            return "seed=" + ",".join(str(s) for s in self.seeds)
        return "observer"


@dataclass(frozen=True)
class Settings:
    """Everything `weavenet launch` was told, validated."""

    peers: tuple[PeerAddress, ...] = ()
    password: str | None = field(default=None, repr=False)  # never printed or logged
    name: PeerName | None = None  # None → the persisted per-instance name (created on first start)
    nickname: str = field(default_factory=socket.gethostname)
    port: int = DEFAULT_PORT
    host: str = ""  # bind address for the mesh; "" = all
    http_addr: HttpAddress | None = field(default_factory=HttpAddress)  # None = API disabled
    state_dir: Path = DEFAULT_STATE_DIR
    conn_limit: int = DEFAULT_CONN_LIMIT
    discovery: bool = True
    trusted_subnets: tuple[IPv4Network, ...] = ()
    log_level: str = "info"
    ipalloc_range: IPv4Network | None = field(default_factory=lambda: IPv4Network(DEFAULT_IPALLOC_RANGE))
    ipalloc_default_subnet: IPv4Network | None = None  # None → the whole range
    ipalloc_init: IpallocInit = field(default_factory=IpallocInit)
    mtu: int | None = None  # None → derived from the underlay
    foreground: bool = False
    datapath: bool = True  # the Rust datapath (bridge, TAP, UDP); off: control plane only
    fastdp: bool = True  # the kernel VXLAN fast path for plain direct peers; off: all on the Rust datapath
    kernel_port_setting: int | None = None  # UDP port of the kernel path; None → the mesh port + 1
    # Docker plugin: on unless --no-plugin; None dir → /run/docker/plugins when it exists and the
    # router runs in the host's network namespace (where dockerd is). Empty names disable a part.
    plugin: bool = True
    plugin_dir: Path | None = None
    plugin_mesh_name: str = "weavemesh"
    plugin_name: str = "weave"
    plugin_network: str = "weave"
    docker_api: str | None = DEFAULT_DOCKER_API  # None: no Docker API (no `weave` network, no lookups)

    @property
    def encrypted(self) -> bool:
        return bool(self.password)

    @property
    def kernel_port(self) -> int:
        return self.kernel_port_setting if self.kernel_port_setting is not None else self.port + 1

    @property
    def default_subnet(self) -> IPv4Network | None:
        return self.ipalloc_default_subnet or self.ipalloc_range


# --- parsing helpers: each raises ValueError with a message that makes sense after "--flag: " ---


def _parse_int(text: str, what: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    try:
        value = int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"{what}, got {text!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{what}, got {value}")
    return value


def _parse_port(text: str) -> int:
    return _parse_int(text, "expected a port number 1-65535", minimum=1, maximum=65535)


def _parse_ipv4_network(text: str) -> IPv4Network:
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(f"{text!r} has host bits set (did you mean {_network_of(text)}?)") from None
        raise ValueError(f"invalid CIDR {text!r} (expected e.g. 10.32.0.0/12)") from None
    if not isinstance(network, IPv4Network):
        raise ValueError(f"{text!r} is IPv6; only IPv4 ranges are supported")
    return network


def _network_of(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        return "a network address"


def _parse_ipalloc_range(text: str) -> IPv4Network | None:
    if not text.strip():
        return None  # empty disables IPAM, as in Weave Net
    network = _parse_ipv4_network(text)
    if network.prefixlen > 30:
        raise ValueError(f"{network} is too small for an allocation range (at most /30)")
    return network


def _parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which Weave Net users' settings were written for."""
    lowered = text.strip()
    if lowered in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if lowered in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"expected a boolean (true/false/1/0), got {text!r}")


def _parse_mtu(text: str) -> int:
    return _parse_int(text, "expected an MTU between 576 and 65535", minimum=576, maximum=65535)


def _parse_subnets(text: str) -> tuple[IPv4Network, ...]:
    return tuple(_parse_ipv4_network(part) for part in text.split(",") if part.strip())


def _parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level == "warn":
        level = "warning"
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _parse_nickname(text: str) -> str:
    text = text.strip()
    if not text or len(text) > 64 or not text.isprintable():
        raise ValueError("expected 1-64 printable characters")
    return text


def _parse_docker_name(text: str) -> str:
    """A Docker driver or network name; empty disables that part of the plugin."""
    name = text.strip()
    if name and (len(name) > 64 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)):
        raise ValueError(f"expected a name of letters, digits, '_', '.', '-' (or empty to disable), got {text!r}")
    return name


def _parse_docker_api(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    path = text.removeprefix("unix://")
    if not path.startswith("/"):
        raise ValueError(f"expected unix:///path/to/docker.sock or an absolute path (empty disables), got {text!r}")
    return path


def _parse_conn_limit(text: str) -> int:
    return _parse_int(text, "expected a non-negative integer", minimum=0, maximum=100_000)


def default_state_dir() -> Path:
    """Per-instance state: the host's directory, or a sub-directory per network namespace.

    Two routers in two network namespaces on one machine share a filesystem, so their default
    state directories must differ: a router in a named namespace (ip netns) keys on the name.
    """
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        host = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return DEFAULT_STATE_DIR
    if ours == host:
        return DEFAULT_STATE_DIR
    try:
        for entry in sorted(Path("/run/netns").iterdir()):
            if entry.stat().st_ino == ours:
                return DEFAULT_STATE_DIR / "netns" / entry.name
    except OSError:
        pass
    return DEFAULT_STATE_DIR / "netns" / f"ino-{ours}"


# --- the flags ---

# (dest, flag, environment variable, parser); the flag's default in argparse is None so that the
# environment can fill it in, and the Settings default applies last.
_VALUED: list[tuple[str, str, str | None, Callable[[str], object]]] = [
    ("password", "--password", "WEAVE_PASSWORD", str),
    ("name", "--name", "WEAVE_PEER_NAME", PeerName.parse),
    ("nickname", "--nickname", "WEAVE_NICKNAME", _parse_nickname),
    ("port", "--port", "WEAVE_PORT", _parse_port),
    ("kernel_port_setting", "--kernel-port", "WEAVE_KERNEL_PORT", _parse_port),
    ("host", "--host", "WEAVE_HOST", str.strip),
    ("http_addr", "--http-addr", "WEAVE_HTTP_ADDR", lambda t: HttpAddress.parse(t) if t.strip() else None),
    ("state_dir", "--state-dir", "WEAVE_STATE_DIR", lambda t: Path(t).absolute()),
    ("conn_limit", "--conn-limit", "CONN_LIMIT", _parse_conn_limit),
    ("trusted_subnets", "--trusted-subnets", "WEAVE_TRUSTED_SUBNETS", _parse_subnets),
    ("log_level", "--log-level", "LOG_LEVEL", _parse_log_level),
    ("ipalloc_range", "--ipalloc-range", "IPALLOC_RANGE", _parse_ipalloc_range),
    ("ipalloc_default_subnet", "--ipalloc-default-subnet", "IPALLOC_DEFAULT_SUBNET", _parse_ipv4_network),
    ("ipalloc_init", "--ipalloc-init", "IPALLOC_INIT", IpallocInit.parse),
    ("mtu", "--mtu", "WEAVE_MTU", _parse_mtu),
    ("plugin_dir", "--plugin-dir", "WEAVE_PLUGIN_DIR", lambda t: Path(t).absolute()),
    ("plugin_mesh_name", "--plugin-mesh-name", "WEAVE_PLUGIN_MESH_NAME", _parse_docker_name),
    ("plugin_name", "--plugin-name", "WEAVE_PLUGIN_NAME", _parse_docker_name),
    ("plugin_network", "--plugin-network", "WEAVE_PLUGIN_NETWORK", _parse_docker_name),
    ("docker_api", "--docker-api", "WEAVE_DOCKER_API", _parse_docker_api),
]

_HELP = {
    "password": "shared secret: encrypts and authenticates all traffic (env WEAVE_PASSWORD)",
    "name": "this peer's name, aa:bb:cc:dd:ee:ff (default: generated once and persisted)",
    "nickname": "a human-friendly label for this peer (default: the hostname)",
    "port": "mesh port, TCP for control and UDP for data (default 6783)",
    "kernel_port_setting": "UDP port of the kernel VXLAN fast path (default: the mesh port + 1, 6784)",
    "host": "address to bind the mesh port to (default: all)",
    "http_addr": "HTTP API address, HOST:PORT or a socket path; empty disables (default 127.0.0.1:6784)",
    "state_dir": "where persisted state lives (default /var/lib/weavenet, per network namespace)",
    "conn_limit": "soft limit on mesh connections (default 200)",
    "trusted_subnets": "comma-separated CIDRs of peers whose data may travel unencrypted",
    "log_level": "debug, info, warning or error (default info)",
    "ipalloc_range": "IP range for IPAM to hand out (default 10.32.0.0/12; empty disables IPAM)",
    "ipalloc_default_subnet": "subnet for allocations that name none (default: the whole range)",
    "ipalloc_init": "consensus[=N], seed=NAME,... or observer (default consensus)",
    "mtu": "overlay MTU (default: from the underlay)",
    "plugin_dir": "where the Docker plugin sockets go (default /run/docker/plugins, if it exists)",
    "plugin_mesh_name": "local-scope driver + IPAM name, socket NAME.sock (default weavemesh; empty: none)",
    "plugin_name": "global-scope driver name, socket NAME.sock (default weave; empty: none)",
    "plugin_network": "Docker network created at start on the local driver (default weave; empty: none)",
    "docker_api": "Docker Engine API socket (default unix:///var/run/docker.sock; empty: none)",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2, without the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The `launch` flags, shared by `weavenet launch` and the V2 plugin entry point."""
    for dest, flag, env, _ in _VALUED:
        help_text = _HELP[dest] + (f" [${env}]" if env and env not in _HELP[dest] else "")
        parser.add_argument(
            flag, dest=dest, default=None, metavar=flag.lstrip("-").upper().replace("-", "_"), help=help_text
        )
    parser.add_argument(
        "--no-discovery", dest="no_discovery", action="store_true", help="do not learn peers from gossip"
    )
    parser.add_argument(
        "--foreground", action="store_true", help="stay attached (for systemd and the Docker V2 plugin)"
    )
    parser.add_argument(
        "--no-plugin", dest="no_plugin", action="store_true", help="do not serve the Docker plugin [$WEAVE_NO_PLUGIN]"
    )
    parser.add_argument(
        "--no-fastdp",
        dest="no_fastdp",
        action="store_true",
        help="no kernel fast path: carry all traffic on the userspace (sleeve) datapath [$WEAVE_NO_FASTDP]",
    )
    parser.add_argument(
        "--no-datapath",
        dest="no_datapath",
        action="store_true",
        help="run no datapath at all: the mesh carries control traffic only [$WEAVE_NO_DATAPATH]",
    )
    parser.add_argument("peers", nargs="*", metavar="PEER[:PORT]", help="peers to connect to")


def settings_from(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Build validated Settings from parsed `launch` arguments and the environment."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for dest, flag, env_name, parse in _VALUED:
        raw = getattr(args, dest, None)
        from_env = None
        if raw is None and env_name and env_name in env:
            raw, from_env = env[env_name], env_name
        if raw is None:
            continue
        try:
            values[dest] = parse(raw)
        except ValueError as exc:
            raise ConfigError(flag, str(exc), from_env) from None
    if values.get("password") == "":
        values["password"] = None
    values.setdefault("state_dir", default_state_dir())
    peers: list[PeerAddress] = []
    for text in _split_peers(getattr(args, "peers", None) or []):
        try:
            peers.append(PeerAddress.parse(text))
        except ValueError as exc:
            raise ConfigError("PEER", str(exc)) from None
    settings = Settings(
        peers=tuple(peers),
        discovery=not getattr(args, "no_discovery", False),
        foreground=bool(getattr(args, "foreground", False)),
        plugin=not _switched_off(args, env, "no_plugin", "--no-plugin", "WEAVE_NO_PLUGIN"),
        datapath=not _switched_off(args, env, "no_datapath", "--no-datapath", "WEAVE_NO_DATAPATH"),
        fastdp=not _switched_off(args, env, "no_fastdp", "--no-fastdp", "WEAVE_NO_FASTDP"),
        **values,  # type: ignore[arg-type]
    )
    _check_consistency(settings)
    return settings


def _switched_off(args: argparse.Namespace, env: Mapping[str, str], dest: str, flag: str, env_name: str) -> bool:
    """A `--no-X` switch, or its environment variable in Go bool syntax."""
    if getattr(args, dest, False):
        return True
    text = env.get(env_name, "")
    if not text.strip():
        return False
    try:
        return _parse_bool(text)
    except ValueError as exc:
        raise ConfigError(flag, str(exc), env_name) from None


def _split_peers(items: Sequence[str]) -> list[str]:
    """Peers may come as separate arguments or comma/space separated (as KUBE_PEERS did)."""
    return [p for item in items for p in item.replace(",", " ").split() if p]


def _check_consistency(settings: Settings) -> None:
    rng, subnet = settings.ipalloc_range, settings.ipalloc_default_subnet
    if subnet is not None:
        if rng is None:
            raise ConfigError("--ipalloc-default-subnet", "needs IPAM (an --ipalloc-range)")
        if not subnet.subnet_of(rng):
            raise ConfigError("--ipalloc-default-subnet", f"{subnet} is not inside the allocation range {rng}")
    if settings.ipalloc_init.mode == "consensus" and settings.ipalloc_init.quorum is not None and rng is None:
        raise ConfigError("--ipalloc-init", "needs IPAM (an --ipalloc-range)")
    if settings.datapath and settings.fastdp and settings.kernel_port == settings.port:
        flag = "--kernel-port" if settings.kernel_port_setting is not None else "--port"
        raise ConfigError(flag, f"UDP {settings.port} is the datapath's port; the kernel path needs another")
    if settings.plugin_mesh_name and settings.plugin_mesh_name == settings.plugin_name:
        raise ConfigError("--plugin-name", f"{settings.plugin_name!r} is also the --plugin-mesh-name; give them apart")


def parse_value(flag: str, text: str) -> object:
    """Validate one flag's value on its own (used by the V2 plugin to check its env up front)."""
    for _, name, _, parse in _VALUED:
        if name == flag:
            try:
                return parse(text)
            except ValueError as exc:
                raise ConfigError(flag, str(exc)) from None
    raise KeyError(flag)


def parse_bool_setting(name: str, text: str) -> bool:
    """A boolean setting in Go syntax (WEAVE_MULTICAST, works.weave.multicast)."""
    try:
        return _parse_bool(text)
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None
