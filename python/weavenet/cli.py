"""The `weavenet` command. It talks to the daemon only through the HTTP API.

`launch` is the exception: it validates the settings, starts the daemon (in the background, or in
this process with --foreground) and waits until its API answers. Errors users see are one line
on stderr: exit 2 for bad arguments, 1 for everything else. Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from weavenet import __version__
from weavenet.api.client import ApiClient, ApiResponse, ApiUnreachable
from weavenet.config import (
    DEFAULT_HTTP_ADDR,
    ConfigError,
    HttpAddress,
    OneLineErrorParser,
    add_launch_arguments,
    default_state_dir,
    settings_from,
)

LAUNCH_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
IPAM_TIMEOUT = 30.0  # rmpeer, reset and prime wait for peers; the router bounds its own waits


class CliError(Exception):
    """A one-line failure for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _client(args: argparse.Namespace, timeout: float = 10.0) -> ApiClient:
    text = args.http_addr or os.environ.get("WEAVE_HTTP_ADDR") or DEFAULT_HTTP_ADDR
    try:
        return ApiClient(HttpAddress.parse(text), timeout=timeout)
    except ValueError as exc:
        raise CliError(f"--http-addr: {exc}", 2) from None


def _state_dir(args: argparse.Namespace) -> Path:
    text = args.state_dir or os.environ.get("WEAVE_STATE_DIR")
    return Path(text).absolute() if text else default_state_dir()


def _check(response_status: int, body: str, what: str) -> None:
    if response_status >= 400:
        raise CliError(f"{what} failed: {body.strip() or f'HTTP {response_status}'}")


def _call(
    args: argparse.Namespace, method: str, path: str, what: str, *, timeout: float = 10.0, **options: Any
) -> ApiResponse:
    """One API request; an unreachable router or an error status becomes a one-line CliError."""
    try:
        reply = _client(args, timeout=timeout).request(method, path, **options)
    except ApiUnreachable as exc:
        raise CliError(str(exc)) from None
    _check(reply.status, reply.text, what)
    return reply


# --- launch / stop / reset ---


def _argv_without_password(argv: Sequence[str]) -> list[str]:
    """The launch arguments minus --password, which goes to the child through its environment."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--password":
            skip = True
        elif not arg.startswith("--password="):
            out.append(arg)
    return out


def cmd_launch(args: argparse.Namespace, launch_argv: Sequence[str]) -> int:
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        raise CliError(f"launch: {exc}", 2) from None
    if settings.foreground:
        import trio

        from weavenet.daemon import run_daemon, setup_logging
        from weavenet.plugin.server import PluginError

        setup_logging(settings.log_level)
        try:
            trio.run(run_daemon, settings)
        except BaseException as exc:
            # trio wraps even a single error from the nursery in exception groups: unwrap it
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if not isinstance(exc, OSError | ConfigError | PluginError):
                raise
            raise CliError(f"launch: {exc}") from None
        return 0

    from weavenet.daemon import LOG_FILE, read_pid_file

    running = read_pid_file(settings.state_dir)
    if running is not None:
        raise CliError(f"weavenet is already running (pid {running}, state in {settings.state_dir})")
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = settings.state_dir / LOG_FILE
    env = dict(os.environ)
    env.pop("EXTRA_ARGS", None)  # already folded into launch_argv
    if settings.password:
        env["WEAVE_PASSWORD"] = settings.password
    child_argv = [
        sys.executable,
        "-m",
        "weavenet",
        "launch",
        "--foreground",
        *_argv_without_password(launch_argv),
    ]
    with open(log_path, "ab") as log_file:
        start_offset = log_file.tell()
        child = subprocess.Popen(
            child_argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    client = ApiClient(settings.http_addr, timeout=2.0) if settings.http_addr else None
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise CliError(f"launch failed (exit {child.returncode}): {_last_error(log_path, start_offset)}")
        if client is not None:
            try:
                if client.request("GET", "/status").status < 500:
                    break
            except ApiUnreachable:
                pass
        elif read_pid_file(settings.state_dir) == child.pid:
            break
        time.sleep(0.1)
    else:
        child.terminate()
        raise CliError(f"launch timed out after {LAUNCH_TIMEOUT:.0f}s; see {log_path}")
    print(f"weavenet launched (pid {child.pid}); log: {log_path}")
    return 0


def _last_error(log_path: Path, offset: int) -> str:
    """The most telling line the daemon logged before it died."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"see {log_path}"
    for line in reversed(lines):
        if " ERROR " in line or "Error" in line or line.startswith("weavenet"):
            return line
    return lines[-1] if lines else f"no output; see {log_path}"


def _stop(args: argparse.Namespace, *, quiet_if_not_running: bool) -> bool:
    """Ask the daemon to stop (API first, signal from the pid file second); wait until it is gone."""
    from weavenet.daemon import read_pid_file

    state_dir = _state_dir(args)
    pid = read_pid_file(state_dir)
    asked = False
    with contextlib.suppress(ApiUnreachable):
        asked = _client(args).request("POST", "/stop").status < 400
    if not asked:
        if pid is None:
            if not quiet_if_not_running:
                print("weavenet is not running")
            return False
        os.kill(pid, 15)
    if pid is not None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while read_pid_file(state_dir) == pid:
            if time.monotonic() > deadline:
                raise CliError(f"weavenet (pid {pid}) did not stop within {STOP_TIMEOUT:.0f}s")
            time.sleep(0.05)
    return True


def cmd_stop(args: argparse.Namespace) -> int:
    _stop(args, quiet_if_not_running=False)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Hand our IPAM ranges to a peer, then stop and forget persisted state (peer name, targets, IPAM)."""
    with contextlib.suppress(ApiUnreachable):
        reply = _client(args, timeout=IPAM_TIMEOUT).request("DELETE", "/peer")
        if reply.status >= 400 and reply.status != 404:  # 404: IPAM disabled, nothing to hand on
            print(f"weavenet reset: warning: {reply.text.strip()}", file=sys.stderr)
    _stop(args, quiet_if_not_running=True)
    _remove_kernel_path()
    state_dir = _state_dir(args)
    from weavenet.store import Store

    for path in state_dir.glob(Store.FILENAME + "*"):
        path.unlink(missing_ok=True)
    print(f"weavenet reset: state in {state_dir} removed")
    return 0


def _remove_kernel_path() -> None:
    """What a killed router's kernel fast path left: its VXLAN port on the bridge and its firewall chain."""
    from weavenet.net import firewall, vxlan

    try:
        for port in vxlan.stale_devices():
            vxlan.close_device(port)
            print(f"weavenet reset: removed {vxlan.device_name(port)}")
        firewall.close_kernel_port()
    except (vxlan.PlumbingError, firewall.FirewallError) as exc:
        print(f"weavenet reset: warning: {exc}", file=sys.stderr)


# --- client commands ---


def cmd_status(args: argparse.Namespace) -> int:
    path = "/status" if not args.view else f"/status/{args.view}"
    reply = _call(args, "GET", path, "status", accept_json=args.json)
    sys.stdout.write(reply.text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    reply = _call(args, "GET", "/report", "report", accept_json=True)
    sys.stdout.write(reply.text)
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    form: list[tuple[str, str]] = [("peer", p) for p in args.peers]
    if args.replace:
        form.append(("replace", "true"))
    _call(args, "POST", "/connect", "connect", form=form)
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    _call(args, "POST", "/forget", "forget", form=[("peer", p) for p in args.peers])
    return 0


def _post_addresses(args: argparse.Namespace, path: str, form: list[tuple[str, str]], what: str) -> int:
    form += [("addr", a) for a in getattr(args, "addrs", [])]
    reply = _call(args, "POST", path, what, form=form)
    if reply.text.strip():
        print(reply.text.strip())
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    form = [("target", args.target)]
    if args.no_multicast_route:
        form.append(("no-multicast-route", "true"))
    return _post_addresses(args, "/attach", form, "attach")


def cmd_detach(args: argparse.Namespace) -> int:
    return _post_addresses(args, "/detach", [("target", args.target)], "detach")


def cmd_expose(args: argparse.Namespace) -> int:
    form = [("skipNAT", "true")] if args.without_masquerade else []
    return _post_addresses(args, "/expose", form, "expose")


def cmd_hide(args: argparse.Namespace) -> int:
    return _post_addresses(args, "/hide", [], "hide")


def cmd_ps(args: argparse.Namespace) -> int:
    from weavenet.net.containers import ps_line

    reply = _call(args, "GET", "/ps", "ps", accept_json=True)
    for row in reply.json():
        if args.targets and not any(row["ID"].startswith(t) for t in args.targets):
            continue
        print(ps_line(row))
    return 0


def cmd_rmpeer(args: argparse.Namespace) -> int:
    for peer in args.peers:
        reply = _call(args, "DELETE", f"/peer/{quote(peer, safe='')}", f"rmpeer {peer}", timeout=IPAM_TIMEOUT)
        print(reply.text.strip())
    return 0


def cmd_prime(args: argparse.Namespace) -> int:
    _call(args, "GET", f"/ring?timeout={IPAM_TIMEOUT:g}", "prime", timeout=IPAM_TIMEOUT + 5)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from weavenet.demo import DemoError, run_demo

    try:
        return run_demo(password=not args.no_password, seconds=args.seconds)
    except DemoError as exc:
        raise CliError(f"demo: {exc}") from None


def cmd_plugin(args: argparse.Namespace) -> int:
    from weavenet.plugin.v2.build import BuildError
    from weavenet.plugin.v2.command import run

    try:
        print(run(args))
    except BuildError as exc:
        raise CliError(f"plugin {args.plugin_command}: {exc}") from None
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from weavenet import _fastdp

    print(f"weavenet {__version__} (core {_fastdp.core_version()})")
    try:
        reply = _client(args).request("GET", "/report", accept_json=True)
        if reply.status == 200:
            print(f"router {reply.json().get('Version', 'unknown')}")
    except (ApiUnreachable, ValueError):
        print("router not running")
    return 0


# --- the parser ---


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="weavenet", description="weavenet: a container network for Docker and Linux")
    parser.add_argument("--version", action="version", version=f"weavenet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    commands.required = True

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--http-addr", default=None, help="the router's API address [$WEAVE_HTTP_ADDR]")
        sub.add_argument("--state-dir", default=None, help="the router's state directory [$WEAVE_STATE_DIR]")
        return sub

    launch = commands.add_parser("launch", help="start the router", description="Start the weavenet router.")
    add_launch_arguments(launch)

    client_command("stop", "stop the router")
    client_command("reset", "stop the router and forget its persisted state").add_argument(
        "--force", action="store_true", help="accepted for compatibility; reset always proceeds"
    )
    status = client_command("status", "show the router's status")
    status.add_argument("view", nargs="?", choices=["peers", "connections", "targets", "ipam"], help="a detailed view")
    status.add_argument("--json", action="store_true", help="JSON instead of text")
    client_command("report", "print the router's full state as JSON")
    connect = client_command("connect", "add connection targets")
    connect.add_argument("--replace", action="store_true", help="replace the target list instead of adding")
    connect.add_argument("peers", nargs="*", metavar="PEER[:PORT]")
    forget = client_command("forget", "remove connection targets")
    forget.add_argument("peers", nargs="+", metavar="PEER[:PORT]")
    client_command("version", "print versions")
    rmpeer = client_command("rmpeer", "take over the IP ranges of dead peers")
    rmpeer.add_argument("peers", nargs="+", metavar="PEER", help="a peer name or an unambiguous nickname")
    client_command("prime", "wait until IPAM is initialised (the ring exists)")
    addr_help = "ADDR: an address with prefix (10.32.1.5/12), net:CIDR, or net:default (the default)"
    attach = client_command("attach", "attach a container or network namespace to the overlay")
    attach.add_argument("--no-multicast-route", action="store_true", help="do not route 224.0.0.0/4 via ethwe0")
    attach.add_argument("addrs", nargs="*", metavar="ADDR", help=addr_help)
    attach.add_argument("target", metavar="TARGET", help="a container name or id, a netns name, or a path")
    detach = client_command("detach", "detach a container or network namespace (all addresses unless given)")
    detach.add_argument("addrs", nargs="*", metavar="ADDR")
    detach.add_argument("target", metavar="TARGET")
    expose = client_command("expose", "give the host an address on the overlay (and masquerade)")
    expose.add_argument("--without-masquerade", action="store_true", help="do not add masquerade rules")
    expose.add_argument("addrs", nargs="*", metavar="ADDR", help=addr_help)
    hide = client_command("hide", "take the host's address(es) off the overlay")
    hide.add_argument("addrs", nargs="*", metavar="ADDR")
    demo = commands.add_parser(
        "demo",
        help="build a 3-host weavenet out of namespaces, show it working, remove it",
        description="Build a 3-host weavenet out of network namespaces on this machine, show status, ps, "
        "pings and iperf3 throughput across it, then remove everything. Needs root.",
    )
    demo.add_argument("--no-password", action="store_true", help="run the mesh without encryption")
    demo.add_argument("--seconds", type=int, default=3, help="iperf3 duration (default 3)")
    ps = client_command("ps", "list attached containers: id, MAC, addresses")
    ps.add_argument("targets", nargs="*", metavar="CONTAINER")
    from weavenet.plugin.v2.command import add_parser as add_plugin_parser

    add_plugin_parser(commands)
    return parser


_HANDLERS = {
    "stop": cmd_stop,
    "reset": cmd_reset,
    "status": cmd_status,
    "report": cmd_report,
    "connect": cmd_connect,
    "forget": cmd_forget,
    "version": cmd_version,
    "rmpeer": cmd_rmpeer,
    "prime": cmd_prime,
    "attach": cmd_attach,
    "detach": cmd_detach,
    "expose": cmd_expose,
    "hide": cmd_hide,
    "ps": cmd_ps,
    "demo": cmd_demo,
    "plugin": cmd_plugin,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = os.environ.get("EXTRA_ARGS", "").split()
    if argv[:1] == ["launch"] and extra:
        argv = ["launch", *extra, *argv[1:]]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "launch":
            return cmd_launch(args, argv[1:])
        return _HANDLERS[args.command](args)
    except CliError as exc:
        print(f"weavenet: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
