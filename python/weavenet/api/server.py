"""A small HTTP/1.1 server on trio (h11), for the HTTP API and the Docker plugin sockets.

It routes `METHOD /path/{param}` to async handlers, serves many connections at once, bounds
request sizes and idle time, and turns `HttpError` into a clean status with a one-line body.
An unexpected handler exception is a bug: it is logged with its traceback and answered 500,
and the server keeps serving. It never blocks the trio loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may sit idle or dribble a request
_PARAM = re.compile(r"\{(\w+)(?::([^}]+))?\}")


class HttpError(Exception):
    """Raised by handlers for an expected failure: answered with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def form(self) -> dict[str, list[str]]:
        """Form fields from the query string and an urlencoded body, as Weave Net's API took them."""
        fields = {k: list(v) for k, v in self.query.items()}
        if self.body and "json" not in self.headers.get("content-type", ""):
            try:
                text = self.body.decode()
            except UnicodeDecodeError:
                raise HttpError(400, "request body is not valid UTF-8") from None
            for key, values in parse_qs(text, keep_blank_values=True).items():
                fields.setdefault(key, []).extend(values)
        return fields

    def flag(self, name: str) -> bool:
        values = self.form().get(name)
        return bool(values) and values[-1].lower() in ("true", "1", "yes", "")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"request body is not valid JSON: {exc}") from None

    def wants_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, value: Any, status: int = 200, *, content_type: str = "application/json") -> Response:
        return cls(status, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode(), content_type)

    @classmethod
    def empty(cls, status: int = 204) -> Response:
        return cls(status, b"")


Handler = Callable[[Request], Awaitable[Response]]


class Router:
    """Maps method + path pattern to a handler. Patterns use `{name}` or `{name:regex}`."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.not_found: Handler | None = None

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = "^" + _PARAM.sub(lambda m: f"(?P<{m.group(1)}>{m.group(2) or '[^/]+'})", pattern) + "$"
        self._routes.append((method.upper(), re.compile(regex), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return register

    async def dispatch(self, request: Request) -> Response:
        allowed: list[str] = []
        for method, regex, handler in self._routes:
            match = regex.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            request.params = {k: unquote(v) for k, v in match.groupdict().items()}
            return await handler(request)
        if allowed:
            raise HttpError(405, f"method {request.method} not allowed on {request.path}")
        if self.not_found is not None:
            return await self.not_found(request)
        raise HttpError(404, f"no such endpoint: {request.method} {request.path}")


async def _respond(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
    ]
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=response.body)) if response.body else b"")
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _read_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(data)


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
    head = await _read_event(conn, stream)
    if isinstance(head, h11.ConnectionClosed):
        return None
    if not isinstance(head, h11.Request):
        raise HttpError(400, "expected an HTTP request")
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
    body = bytearray()
    while True:
        event = await _read_event(conn, stream)
        if isinstance(event, h11.EndOfMessage):
            break
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.ConnectionClosed):
            return None
    target = urlsplit(head.target.decode("latin-1"))
    return Request(
        method=head.method.decode().upper(),
        path=target.path or "/",
        query=parse_qs(target.query, keep_blank_values=True),
        headers=headers,
        body=bytes(body),
    )


async def serve_connection(stream: trio.abc.Stream, router: Router) -> None:
    """Serve one HTTP/1.1 connection (keep-alive) until the client closes or idles out."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    request = await _read_request(conn, stream)
            except HttpError as exc:
                await _respond(conn, stream, Response.text(exc.message + "\n", exc.status))
                return
            except (h11.RemoteProtocolError, trio.TooSlowError):
                if conn.their_state is h11.IDLE:
                    return  # an idle keep-alive connection: close quietly, a 400 would be unsolicited
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(conn, stream, Response.text("malformed or incomplete HTTP request\n", 400))
                return
            if request is None:
                return
            try:
                response = await router.dispatch(request)
            except HttpError as exc:
                response = Response.text(exc.message.rstrip("\n") + "\n", exc.status)
            except Exception:
                log.exception("bug: handler for %s %s failed", request.method, request.path)
                response = Response.text("internal error (see the router's log)\n", 500)
            await _respond(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, ConnectionError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve_tcp(
    router: Router, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    task_status.started()
    await trio.serve_listeners(lambda s: serve_connection(s, router), listeners)


def remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket file (never a regular file: that would be someone else's)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def serve_unix(
    router: Router,
    path: Path,
    *,
    mode: int = 0o600,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on a unix socket that only root (the owner) may use; removed again on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    try:
        task_status.started()
        await trio.serve_listeners(lambda s: serve_connection(s, router), [listener])
    finally:
        try:
            remove_stale_socket(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)
