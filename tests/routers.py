"""Real weavenet routers in lab hosts: start them as a user would, read their API as a script would.

Each router runs `weavenet launch --foreground` inside its host's namespace, with its state under
the host's log directory and its HTTP API on a unix socket there, so the test process reads every
router's API directly (no need to enter the namespace for each poll).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.lab import Host, LabProcess, wait_until
from weavenet.api.client import ApiClient, ApiUnreachable
from weavenet.config import HttpAddress

WEAVENET = str(Path(sys.executable).with_name("weavenet"))


class LabRouter:
    def __init__(
        self,
        host: Host,
        peers: Sequence[str] = (),
        *,
        password: str | None = None,
        extra: Sequence[str] = (),
        name: str = "weavenet",
    ) -> None:
        self.host = host
        # State and API socket belong to the host, not the process: a restarted router finds them.
        self.state_dir = host.logdir / "weavenet-state"
        self.api_socket = host.logdir / "weavenet-api.sock"
        self.argv = [
            WEAVENET,
            "launch",
            "--foreground",
            "--state-dir",
            str(self.state_dir),
            "--http-addr",
            str(self.api_socket),
            "--nickname",
            host.label,
            "--log-level",
            "debug",
            *extra,
            *peers,
        ]
        env: dict[str, str | None] = {"WEAVE_PASSWORD": password, "EXTRA_ARGS": None}
        self.client = ApiClient(HttpAddress(unix_path=str(self.api_socket)), timeout=5.0)
        self.process: LabProcess = host.start(self.argv, name=name, env=env)

    def __repr__(self) -> str:
        return f"<LabRouter {self.host.label}>"

    # --- reading the API ---

    def report(self) -> dict[str, Any] | None:
        """The router's /report, or None while it does not answer."""
        try:
            reply = self.client.request("GET", "/report", accept_json=True)
        except ApiUnreachable:
            return None
        return reply.json() if reply.status == 200 else None

    def router(self) -> dict[str, Any]:
        report = self.report()
        if report is None:
            raise AssertionError(f"{self} does not answer; log:\n{self.log()[-3000:]}")
        return report["Router"]

    def wait_ready(self, timeout: float = 60.0) -> None:
        def answers() -> bool:
            if self.process.returncode is not None:
                raise AssertionError(f"{self} exited ({self.process.returncode}); log:\n{self.log()[-3000:]}")
            return self.report() is not None

        wait_until(answers, timeout=timeout, message=f"{self} API to answer")

    @property
    def name(self) -> str:
        return str(self.router()["Name"])

    def peer_names(self) -> set[str]:
        return {p["Name"] for p in self.router()["Peers"]}

    def established(self) -> set[str]:
        """Names of the peers this router has an established connection with."""
        peers = {p["Name"]: p for p in self.router()["Peers"]}
        me = peers.get(self.name, {"Connections": []})
        return {c["Name"] for c in me["Connections"] if c.get("Established")}

    def connections(self) -> list[dict[str, Any]]:
        return list(self.router()["Connections"])

    def cli(self, *args: str, check: bool = True) -> str:
        """Run `weavenet ARGS` against this router, inside its host, as a user would."""
        result = self.host.run(
            [WEAVENET, *args, "--http-addr", str(self.api_socket)],
            check=check,
            env={"EXTRA_ARGS": None},
        )
        return result.stdout + result.stderr

    def log(self) -> str:
        return self.process.stderr() + self.process.stdout()

    def metrics(self) -> str:
        return self.client.request("GET", "/metrics").text

    def rss_bytes(self) -> int:
        pid = self.process.pid
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def full_mesh(routers: Sequence[LabRouter]) -> bool:
    """Every router knows every other and has an established connection to each."""
    try:
        names = {r.name for r in routers}
        return all(r.peer_names() == names and r.established() == names - {r.name} for r in routers)
    except (AssertionError, KeyError, json.JSONDecodeError):
        return False
