"""Two Docker 20.10 daemons sharing an etcd cluster store, each beside its own weavenet router.

The only way left to run a global-scope legacy network driver (`weave`): Docker removed the cluster
store in 23.0. On tests/docker_hosts.py's two hosts (underlay 192.168.252.0/24): etcd in the hub
(:2379, v2 API); on each host a weavenet router (plugin sockets in that host's /run/docker/plugins;
its Rust datapath on by default: bridge weave, TAP weave-dp, UDP 6783 over ul0), then dockerd
--cluster-store etcd://192.168.252.254:2379/<tag>. Follows shared/spec/cluster-store-lab.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.docker_hosts import DOCKERD_FLAGS, DockerHost, DockerHostsLab, run, wait_for

ETCD = "/usr/bin/etcd"

HOST_BODY = r"""
"$WEAVENET" launch --foreground --state-dir $D/state --http-addr $D/api.sock --nickname $TAG-$NAME \
    --plugin-dir /run/docker/plugins --plugin-network "" --docker-api unix://$D/docker.sock \
    --log-level debug > $D/router.log 2>&1 &
RPID=$!
for i in $(seq 300); do   # up to 30 s for the router's plugin socket; dockerd activates it at start
    [ -S /run/docker/plugins/weave.sock ] && break
    kill -0 $RPID 2>/dev/null || { echo "the router exited before serving weave.sock: see router.log" >&2; exit 1; }
    sleep 0.1
done
[ -S /run/docker/plugins/weave.sock ] || { echo "no weave.sock after 30 s: see router.log" >&2; exit 1; }
"$DOCKERD" -H unix://$D/docker.sock FLAGS \
    --cluster-store=etcd://$KV:2379/$TAG --cluster-advertise=$ADDR:2376 \
    --cluster-store-opt discovery.heartbeat=2 --cluster-store-opt discovery.ttl=6 > $D/dockerd.log 2>&1 &
PIDS="$! $RPID"
""".replace("FLAGS", DOCKERD_FLAGS)


class StoreHost(DockerHost):
    LOGS = ("launcher.log", "router.log", "dockerd.log")

    @property
    def api_socket(self) -> Path:
        return self.dir / "api.sock"

    def report(self) -> dict[str, Any]:
        out = run(
            "curl", "-sf", "--unix-socket", str(self.api_socket), "-H", "Accept: application/json", "http://x/report"
        )
        return json.loads(out.stdout)


class ClusterStoreLab(DockerHostsLab):
    """etcd plus hosts a and b, each with a router and a dockerd on the store."""

    PREFIX = "wcs"
    SUBNET = "192.168.252"
    HOST_BODY = HOST_BODY
    HOST_CLASS = StoreHost

    def __init__(self, tag: str | None = None) -> None:
        super().__init__(tag)
        self.etcd: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> tuple[StoreHost, StoreHost]:
        return self.a, self.b  # type: ignore[return-value]

    def host_env(self) -> dict[str, str]:
        return {"KV": self.hub_address}

    def start_hub(self) -> None:
        (self.workdir / "kv").mkdir()
        etcd_log = open(self.workdir / "kv" / "etcd.log", "wb")  # noqa: SIM115 (the child keeps it)
        client_url = f"http://{self.hub_address}:2379"
        self.etcd = subprocess.Popen(
            [
                *["ip", "netns", "exec", self.hub, ETCD, "--name", self.hub],
                *["--data-dir", str(self.workdir / "kv" / "data")],
                *["--listen-client-urls", client_url, "--advertise-client-urls", client_url],
                *["--listen-peer-urls", "http://127.0.0.1:2380"],
                *["--initial-advertise-peer-urls", "http://127.0.0.1:2380"],
                *["--initial-cluster", f"{self.hub}=http://127.0.0.1:2380", "--enable-v2=true"],
            ],
            stdout=etcd_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        etcd_log.close()
        wait_for(self._etcd_ready, timeout=20, what="etcd's v2 API", interval=0.1)

    def after_start(self) -> None:
        wait_for(lambda: len(self.registered_nodes()) == 2, timeout=30, what="both daemons in the store")

    def stop_hub(self) -> None:
        if self.etcd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.etcd.pid, signal.SIGTERM)
        try:
            self.etcd.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.etcd.pid, signal.SIGKILL)
            self.etcd.wait(5)

    def _etcd(self, path: str) -> subprocess.CompletedProcess[str]:
        return self.hub_run("curl", "-sf", f"http://{self.hub_address}:2379/v2/keys/{path}", check=False)

    def _etcd_ready(self) -> bool:
        return self._etcd("").returncode == 0

    def registered_nodes(self) -> list[str]:
        probe = self._etcd(f"{self.tag}/docker/nodes")
        if probe.returncode != 0:
            return []
        nodes = json.loads(probe.stdout).get("node", {}).get("nodes", [])
        return [str(n.get("value")) for n in nodes]
