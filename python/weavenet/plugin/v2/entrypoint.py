"""PID 1 of the managed plugin: validate every setting first, then run the router in the foreground.

Docker shows a managed plugin's output only in its own daemon log (tagged `plugin=<id>`), and a
plugin that dies before its socket exists only makes `docker plugin enable` fail with "socket
not found" (Weave Net's users got nothing else). So before anything touches the host, this
checks the whole configuration (environment, EXTRA_ARGS, IPALLOC_RANGE against the host's
routes, the ports, /dev/net/tun) and on a problem writes one line saying what is wrong and how to
fix it, then exits 1. As PID 1 the kernel delivers SIGTERM only to a handler, so the launcher
(rootfs.LAUNCHER_SOURCE) installs one before the first import that takes time; once the router
runs, SIGTERM stops it cleanly (its own handler). On a clean stop the host is tidied if no
container uses the bridge any more: the `weave` bridge and our iptables chains go, the state
directory stays.
It must never run its host-changing steps outside the plugin: those are guarded by PID 1.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import shlex
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from weavenet.config import (
    ConfigError,
    Settings,
    add_launch_arguments,
    parse_bool_setting,
    settings_from,
)
from weavenet.plugin.v2.config_json import DOCKER_SOCKET, PLUGIN_DIR, REF_ENV, SOCKET, STATE_DIR

if TYPE_CHECKING:
    from weavenet.daemon import Node, PluginFactory

log = logging.getLogger("weavenet.plugin.v2")

# Environment variables whose empty value means "not set" (Docker passes every declared one).
# IPALLOC_RANGE is not among them: empty disables IPAM, as for `weavenet launch`.
EMPTY_MEANS_UNSET = ("WEAVE_PASSWORD", "WEAVE_MTU", "LOG_LEVEL", "WEAVE_MULTICAST", "EXTRA_ARGS", "WEAVE_PEERS")
TUN = Path("/dev/net/tun")


class _ArgsParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError("EXTRA_ARGS", message)


@dataclass(frozen=True)
class Plan:
    """What the plugin will run, every part validated."""

    settings: Settings
    ref: str
    multicast_default: bool


def plan_from(env: Mapping[str, str]) -> Plan:
    """Settings from the plugin's environment. Raises ConfigError (one line) for anything wrong."""
    env = {k: v for k, v in env.items() if not (k in EMPTY_MEANS_UNSET and not v.strip())}
    try:
        extra = shlex.split(env.get("EXTRA_ARGS", ""))
    except ValueError as exc:
        raise ConfigError("EXTRA_ARGS", f"cannot split {env['EXTRA_ARGS']!r}: {exc}") from None
    parser = _ArgsParser(prog="EXTRA_ARGS", add_help=False)
    add_launch_arguments(parser)
    args = parser.parse_args([*extra, *env.get("WEAVE_PEERS", "").replace(",", " ").split()])
    if args.state_dir is None:
        args.state_dir = STATE_DIR
    if args.docker_api is None and "WEAVE_DOCKER_API" not in env:
        args.docker_api = DOCKER_SOCKET
    settings = settings_from(args, env)
    settings = replace(
        settings,
        foreground=True,
        plugin=False,  # no legacy sockets, no `weave` network: the V2 service is all
        plugin_dir=Path(PLUGIN_DIR),
        plugin_mesh_name="",
        plugin_name="",
        plugin_network="",
    )
    multicast = parse_bool_setting("WEAVE_MULTICAST", env["WEAVE_MULTICAST"]) if "WEAVE_MULTICAST" in env else False
    ref = env.get(REF_ENV, "").strip() or "weavenet"
    return Plan(settings, ref, multicast)


def check_host(plan: Plan, env: Mapping[str, str]) -> None:
    """What only the host can tell: the range against its routes, free ports, the TUN device."""
    from weavenet.ipam.hostcheck import check_range_is_free

    settings = plan.settings
    if settings.ipalloc_range is not None:
        try:
            check_range_is_free(settings.ipalloc_range)
        except ConfigError as exc:
            if "--ipalloc-range" in env.get("EXTRA_ARGS", ""):
                raise
            message = str(exc).removeprefix("--ipalloc-range: ")
            raise ConfigError("--ipalloc-range", message, "IPALLOC_RANGE") from None
    if settings.datapath and not TUN.exists():
        raise ConfigError(
            "/dev/net/tun", "missing: the datapath needs it (config.json devices); --no-datapath avoids it"
        )
    _check_port_free(socket.SOCK_STREAM, settings.host, settings.port, "--port", "mesh (TCP)")
    if settings.datapath:
        _check_port_free(socket.SOCK_DGRAM, settings.host, settings.port, "--port", "data (UDP)")
    http = settings.http_addr
    if http is not None and http.unix_path is None:
        _check_port_free(socket.SOCK_STREAM, http.host, http.port, "--http-addr", "HTTP API")


def _check_port_free(kind: socket.SocketKind, host: str, port: int, flag: str, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    flag,
                    f"the {what} port {port} is already in use on this host (another weavenet router? "
                    "stop it with `weavenet stop`, or give the plugin another port in EXTRA_ARGS)",
                ) from None
            raise ConfigError(flag, f"cannot use the {what} port {port}: {exc.strerror}") from None


# --- inside the plugin only (PID 1 of its own namespaces) ---


def writable_proc_sys_net() -> None:
    """Docker mounts /proc/sys read-only in the plugin; our links' IPv6 knobs live under net/.

    Rebinds /proc/sys/net read-write in the plugin's own mount namespace (CAP_SYS_ADMIN). Best
    effort: without it the kernel defaults stay on our links, nothing breaks.
    """
    target = b"/proc/sys/net"
    if os.getpid() != 1 or not (os.statvfs(target).f_flag & os.ST_RDONLY):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    ms_remount, ms_bind, ms_rec = 32, 4096, 16384
    if libc.mount(target, target, None, ms_bind | ms_rec, None) != 0 or (
        libc.mount(None, target, None, ms_remount | ms_bind, None) != 0
    ):
        log.debug("/proc/sys/net stays read-only: %s", os.strerror(ctypes.get_errno()))


def tidy_host() -> None:
    """After a clean stop: remove the bridge and our iptables chains unless containers still use them."""
    from weavenet.net import bridge, firewall
    from weavenet.net.overlay import TAP_NAME

    ports = [p for p in bridge.bridge_ports() if p != TAP_NAME]
    if ports:
        log.info("keeping bridge %s: in use by %s", bridge.BRIDGE_NAME, ", ".join(sorted(ports)))
        return
    from weavenet.ipam.hostcheck import bridge_addresses

    if bridge_addresses():
        log.info("keeping bridge %s: it has the host's address (weavenet expose)", bridge.BRIDGE_NAME)
        return
    try:
        if bridge.delete_link(bridge.BRIDGE_NAME):
            log.info("removed bridge %s (unused)", bridge.BRIDGE_NAME)
        firewall.remove_all()
    except (bridge.PlumbingError, firewall.FirewallError, OSError) as exc:
        log.warning("could not tidy the host: %s", exc)


# --- main ---


def _factory(plan: Plan) -> PluginFactory:
    from weavenet.plugin.docker_api import DockerClient
    from weavenet.plugin.v2.service import V2PluginService
    from weavenet.plugin.v2.swarm import SwarmPeers, forget_dropped_setting_peers

    def make(node: Node) -> V2PluginService:
        settings = node.settings
        forget_dropped_setting_peers(node.router, node.store, [str(p) for p in settings.peers])
        docker = DockerClient(settings.docker_api) if settings.docker_api else None

        async def on_peer(address: str) -> None:
            errors = await node.router.connect([address])
            if errors:
                log.warning("not connecting to discovered node %s: %s", address, "; ".join(errors))

        swarm = SwarmPeers(docker, node.router, node.store, port=settings.port) if docker is not None else None
        return V2PluginService(
            settings,
            Path(PLUGIN_DIR),
            ref=plan.ref,
            socket=SOCKET,
            store=node.store,
            allocator=lambda: node.ipam,
            on_peer=on_peer,
            multicast_default=plan.multicast_default,
            swarm=swarm,
            docker=docker,
        )

    return make


def _say(message: str) -> None:
    print(f"weavenet plugin: {message}", file=sys.stderr, flush=True)


def _stop_now(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(env: Mapping[str, str] | None = None) -> int:
    if os.getpid() == 1:  # the launcher did this already, before the imports; to be sure
        signal.signal(signal.SIGTERM, _stop_now)
    env = dict(os.environ if env is None else env)
    try:
        plan = plan_from(env)
        check_host(plan, env)
    except ConfigError as exc:
        ref = env.get(REF_ENV) or "PLUGIN"
        _say(f"cannot start: {exc} (fix: docker plugin disable {ref}; docker plugin set {ref} NAME=VALUE)")
        return 1
    import functools

    import trio

    from weavenet.daemon import run_daemon, setup_logging
    from weavenet.plugin.server import PluginError

    setup_logging(plan.settings.log_level)
    log.info("managed plugin %s: validated settings, starting the router", plan.ref)
    writable_proc_sys_net()
    try:
        trio.run(functools.partial(run_daemon, plan.settings, plugin_factory=_factory(plan)))
    except BaseException as exc:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            return 0
        if not isinstance(exc, OSError | ConfigError | PluginError):
            raise
        _say(f"stopped: {exc}")
        return 1
    if os.getpid() == 1:
        tidy_host()
    return 0
