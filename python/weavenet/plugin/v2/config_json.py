"""The managed plugin's manifest (config.json): what Docker must grant and what users may set.

One source of truth for the settable environment: the manifest, the entry point's validation and
the documentation all read `SETTINGS`. Pure data; never touches the host.

Decisions (see also the issue's closing note):
* NetworkDriver only, no IpamDriver. In swarm mode the managers allocate every pool and address
  centrally (raft-replicated) and each node then asks for the same pool again (docker-lab.md
  G14); weavenet's IPAM is a per-host ring, so serving both would hand the manager's ranges to
  every node and double every call for nothing. Swarm's IPAM already gives cluster-wide unique
  addresses; IPALLOC_RANGE still configures the router's own IPAM (`weavenet attach`/`expose`).
* Capabilities, on top of Docker's default set: CAP_NET_ADMIN (the `weave` bridge, veths, the
  TAP, routes and iptables rules in the host's network namespace) and CAP_SYS_ADMIN (setns into
  a container's namespace, and making /proc/sys/net writable inside the plugin so that our links'
  IPv6 settings can be written). No CAP_SYS_MODULE: weavenet loads no kernel module.
* /dev/net/tun: the datapath's TAP. Host networking: the bridge, the mesh port (TCP+UDP 6783)
  and the HTTP API (127.0.0.1:6784) live in the host's namespace, where `weavenet status` finds it.
* Mounts: /var/lib/weavenet (state survives disable, upgrade and removal) and the Docker socket
  (swarm peers, network names, `weavenet ps`); both sources are settable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOCKET = "weave.sock"
DEFAULT_NAME = "weavenet/net-plugin:latest"
STATE_DIR = "/var/lib/weavenet"
DOCKER_SOCKET = "/var/run/docker.sock"
PLUGIN_DIR = "/run/docker/plugins"  # Docker bind-mounts /run/docker/plugins/<id>/ here
PYTHON = "/usr/local/bin/python3"
LAUNCHER = "/usr/local/bin/weavenet-plugin"
SITE_DIR = "/usr/local/lib/weavenet"  # weavenet and its dependencies (on sys.path via LAUNCHER)
BUILD_INFO = "/etc/weavenet-plugin.json"  # name, version, build time: also makes each rootfs unique
REF_ENV = "WEAVE_PLUGIN_REF"  # the plugin's own NAME:TAG (Docker's driver name), written at build


@dataclass(frozen=True)
class Setting:
    """One environment variable users can change with `docker plugin set NAME KEY=VALUE`."""

    name: str
    default: str
    description: str


SETTINGS: tuple[Setting, ...] = (
    Setting("WEAVE_PASSWORD", "", "shared secret: encrypt and authenticate the mesh (empty: no encryption)"),
    Setting("WEAVE_MTU", "", "overlay MTU (empty: derived from the underlay)"),
    Setting("WEAVE_MULTICAST", "", "true: networks without works.weave.multicast get the multicast route"),
    Setting("IPALLOC_RANGE", "10.32.0.0/12", "range of the router's own IPAM (attach/expose); empty disables it"),
    Setting("EXTRA_ARGS", "", "more `weavenet launch` flags and peers, e.g. --trusted-subnets=... 192.0.2.7"),
    Setting("LOG_LEVEL", "info", "debug, info, warning or error (in the Docker daemon's log)"),
    Setting("WEAVE_PEERS", "", "peers to connect to besides the swarm's nodes (space or comma separated)"),
)


def plugin_config(name: str) -> dict[str, Any]:
    """config.json for the plugin `name` (NAME:TAG, which is also Docker's driver name)."""
    env: list[dict[str, Any]] = [
        {"name": s.name, "description": s.description, "settable": ["value"], "value": s.default} for s in SETTINGS
    ]
    env.append({"name": REF_ENV, "description": "this plugin's name (set at build)", "value": name})
    return {
        "description": "weavenet: a Weave Net style container network for swarm services (managed plugin)",
        "documentation": "weavenet plugin --help; README.md (Docker managed plugin)",
        "entrypoint": [PYTHON, "-I", "-S", "-u", LAUNCHER],
        "workdir": "/",
        "interface": {"socket": SOCKET, "types": ["docker.networkdriver/1.0"]},
        "network": {"type": "host"},
        "linux": {
            "capabilities": ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"],
            "devices": [{"name": "tun", "description": "the datapath's TAP", "path": "/dev/net/tun"}],
        },
        "mounts": [
            {
                "name": "state",
                "description": "persisted router state (peer name, targets, IPAM, networks)",
                "source": STATE_DIR,
                "destination": STATE_DIR,
                "type": "bind",
                "options": ["rbind", "rw"],
                "settable": ["source"],
            },
            {
                "name": "docker",
                "description": "the Docker Engine API (swarm peers, network names, ps)",
                "source": DOCKER_SOCKET,
                "destination": DOCKER_SOCKET,
                "type": "bind",
                "options": ["rbind", "rw"],
                "settable": ["source"],
            },
        ],
        "env": env,
    }
