"""A small async client for the Docker Engine API on its unix socket (trio + h11).

We call Docker for a handful of things only: inspect a container (attach by name, reclaim
addresses), create the `weave` network, read swarm nodes, follow container events. Paths are
unversioned so the same client works with old daemons (20.10, API 1.41) and new ones. Every call
has a deadline; a followed stream has one until Docker answers, then lasts until Docker ends it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import h11
import trio

DOCKER_SOCKET = "/var/run/docker.sock"
TIMEOUT = 10.0


class DockerError(Exception):
    """Docker answered with an error, or could not be reached. `status` is 0 when unreachable."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class DockerResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def message(self) -> str:
        try:
            value = self.json()
        except ValueError:
            return self.body.decode(errors="replace").strip()
        if isinstance(value, dict) and "message" in value:
            return str(value["message"])
        return self.body.decode(errors="replace").strip()


class DockerClient:
    def __init__(self, socket_path: str = DOCKER_SOCKET, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def request(
        self, method: str, path: str, *, body: Any = None, query: dict[str, str] | None = None
    ) -> DockerResponse:
        target = path + ("?" + urlencode(query) if query else "")
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "docker"), ("Content-Length", str(len(payload))), ("Connection", "close")]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_unix_socket(self.socket_path)
                async with stream:
                    conn = h11.Connection(h11.CLIENT)
                    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
                    if payload:
                        await stream.send_all(conn.send(h11.Data(data=payload)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    status, chunks = 0, []
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            chunks.append(bytes(event.data))
                        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                            break
        except trio.TooSlowError:
            raise DockerError(f"Docker did not answer {method} {path} within {self.timeout:.0f}s") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise DockerError(f"cannot talk to Docker at {self.socket_path}: {exc}") from None
        return DockerResponse(status, b"".join(chunks))

    async def follow(
        self,
        path: str,
        handle: Callable[[Any], Awaitable[None]],
        *,
        query: dict[str, str] | None = None,
        on_open: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """GET a stream of JSON values, one a line (`/events`), and hand each to `handle`, in order.

        `on_open` runs once Docker has accepted the request, before the first value. Returns when
        Docker ends the stream; raises DockerError if Docker cannot be reached or refuses.
        """
        target = path + ("?" + urlencode(query) if query else "")
        headers = [("Host", "docker"), ("Content-Length", "0")]
        try:
            with trio.fail_after(self.timeout):
                stream = await trio.open_unix_socket(self.socket_path)
        except trio.TooSlowError:
            raise DockerError(f"Docker did not answer GET {path} within {self.timeout:.0f}s") from None
        except OSError as exc:
            raise DockerError(f"cannot talk to Docker at {self.socket_path}: {exc}") from None
        try:
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                pending, status, refusal = b"", 0, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await (stream.receive_some(65536) if status else _within(self.timeout, stream))
                        conn.receive_data(data)
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        if status < 400 and on_open is not None:
                            await on_open()
                    elif isinstance(event, h11.Data) and status >= 400:
                        refusal += bytes(event.data)
                    elif isinstance(event, h11.Data):
                        pending += bytes(event.data)
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            if line.strip():
                                await handle(json.loads(line))
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, json.JSONDecodeError) as exc:
            raise DockerError(f"Docker's stream {path} broke: {exc}") from None
        if status >= 400:
            raise DockerError(f"GET {path}: {DockerResponse(status, refusal).message}", status)

    async def call(self, method: str, path: str, *, body: Any = None, query: dict[str, str] | None = None) -> Any:
        """Like `request`, but a status >= 400 raises DockerError with Docker's message."""
        reply = await self.request(method, path, body=body, query=query)
        if reply.status >= 400:
            raise DockerError(f"{method} {path}: {reply.message}", reply.status)
        return reply.json()

    async def version(self) -> dict[str, Any]:
        return await self.call("GET", "/version")

    async def inspect_container(self, name_or_id: str) -> dict[str, Any] | None:
        reply = await self.request("GET", f"/containers/{quote(name_or_id, safe='')}/json")
        if reply.status == 404:
            return None
        if reply.status >= 400:
            raise DockerError(f"inspect {name_or_id}: {reply.message}", reply.status)
        return reply.json()

    async def list_containers(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/containers/json")

    async def inspect_network(self, name_or_id: str) -> dict[str, Any] | None:
        reply = await self.request("GET", f"/networks/{quote(name_or_id, safe='')}")
        if reply.status == 404:
            return None
        if reply.status >= 400:
            raise DockerError(f"inspect network {name_or_id}: {reply.message}", reply.status)
        return reply.json()

    async def create_network(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self.call("POST", "/networks/create", body=spec)

    async def remove_network(self, name_or_id: str) -> None:
        reply = await self.request("DELETE", f"/networks/{quote(name_or_id, safe='')}")
        if reply.status >= 400 and reply.status != 404:
            raise DockerError(f"remove network {name_or_id}: {reply.message}", reply.status)

    async def info(self) -> dict[str, Any]:
        return await self.call("GET", "/info")

    async def swarm_nodes(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/nodes")


async def _within(seconds: float, stream: trio.SocketStream) -> bytes:
    """Docker's first bytes (the response head), which must come within the client's deadline."""
    try:
        with trio.fail_after(seconds):
            return await stream.receive_some(65536)
    except trio.TooSlowError:
        raise OSError(f"no answer within {seconds:.0f}s") from None
