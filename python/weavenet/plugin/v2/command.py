"""`weavenet plugin build|install`: the managed (V2) plugin from the command line.

    weavenet plugin build   [--name NAME:TAG] [--keep DIR]     folder + docker plugin create
    weavenet plugin install [--name NAME:TAG] [KEY=VALUE ...]  build, docker plugin set, enable
    weavenet plugin enable  [--name NAME:TAG]                  enable; on failure, the plugin's reason
    weavenet plugin disable [--name NAME:TAG] [--force]        disable once Docker is done with its networks
    weavenet plugin remove  [--name NAME:TAG] [--force]        disable as above, then docker plugin rm

Errors are one line (BuildError); the CLI prints them and exits 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from weavenet.config import OneLineErrorParser
from weavenet.plugin.v2.config_json import DEFAULT_NAME, SETTINGS
from weavenet.plugin.v2.lifecycle import NETWORKS_WAIT

STALE_HELP = (
    "If Docker still counts the plugin as in use with no network of it left (a release it dropped "
    "while the plugin was disabled), this says so and uses --force: only a daemon restart resets "
    "that count"
)

EPILOG = "settable with `docker plugin set NAME KEY=VALUE` (while disabled):\n" + "\n".join(
    f"  {s.name:<16} {s.description}" + (f" (default {s.default})" if s.default else "") for s in SETTINGS
)


def non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 to 3600 seconds")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plugin = commands.add_parser(
        "plugin",
        help="build and install the Docker managed (V2) plugin for swarm mode",
        description="The Docker managed (V2) plugin: weavenet networks for swarm services, no registry needed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = plugin.add_subparsers(dest="plugin_command", metavar="ACTION", parser_class=OneLineErrorParser)
    actions.required = True
    build = actions.add_parser("build", help="make the plugin from this host's weavenet and `docker plugin create` it")
    build.add_argument(
        "--name", default=DEFAULT_NAME, help=f"plugin (and Docker driver) name NAME:TAG (default {DEFAULT_NAME})"
    )
    build.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep the plugin folder in DIR")
    install = actions.add_parser(
        "install",
        help="build, apply settings, enable",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument("--name", default=DEFAULT_NAME, help=f"plugin name NAME:TAG (default {DEFAULT_NAME})")
    install.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="settings to apply before enabling")
    enable = actions.add_parser("enable", help="docker plugin enable, showing the plugin's reason if it fails")
    enable.add_argument("--name", default=DEFAULT_NAME, help=f"plugin name NAME:TAG (default {DEFAULT_NAME})")
    for action, help_text in (
        ("disable", "docker plugin disable, once Docker has deleted its copies of the plugin's networks"),
        ("remove", "disable as `disable` does, then docker plugin rm (the state directory stays)"),
    ):
        stop = actions.add_parser(action, help=help_text, description=help_text + ". " + STALE_HELP)
        stop.add_argument("--name", default=DEFAULT_NAME, help=f"plugin name NAME:TAG (default {DEFAULT_NAME})")
        stop.add_argument("--force", action="store_true", help="go on although networks of the plugin still exist")
        stop.add_argument(
            "--wait",
            type=non_negative_seconds,
            default=NETWORKS_WAIT,
            metavar="SECONDS",
            help=f"how long to wait for Docker to delete the plugin's networks (default {NETWORKS_WAIT:g})",
        )


def run(args: argparse.Namespace) -> str:
    """Do it; returns what to print. Raises BuildError."""
    from weavenet.plugin.v2 import build

    if args.plugin_command == "build":
        built = build.build(args.name, keep=args.keep)
        kept = f"; folder kept in {built.folder}" if built.folder else ""
        return f"plugin {built.name} created in {built.seconds:.1f}s (rootfs {built.rootfs_seconds:.1f}s){kept}"
    if args.plugin_command in ("disable", "remove"):
        from weavenet.plugin.v2 import lifecycle

        stop = lifecycle.disable if args.plugin_command == "disable" else lifecycle.remove
        return stop(args.name, force=args.force, wait=args.wait).text()
    if args.plugin_command == "enable":
        name = build.normalise_name(args.name)
        seconds = build.enable(name)
        return f"plugin {name} enabled in {seconds:.1f}s"
    built = build.install(args.name, args.settings)
    return (
        f"plugin {built.name} installed and enabled; create networks with "
        f"`docker network create -d {built.name} --attachable NAME` on a swarm manager"
    )
