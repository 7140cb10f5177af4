"""The CLI's side of the HTTP API: one request at a time, over TCP or a unix socket.

Blocking and short (the CLI is a plain program); never used inside the daemon's trio loop.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from weavenet.config import HttpAddress


class ApiUnreachable(Exception):
    """Nothing answers at the API address: the router is not running (or listens elsewhere)."""


@dataclass
class ApiResponse:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the API's socket mode, and Docker plugin sockets)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    def __init__(self, address: HttpAddress, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.unix_path:
            return UnixHTTPConnection(self.address.unix_path, self.timeout)
        host = "127.0.0.1" if self.address.host in ("", "0.0.0.0") else self.address.host
        return http.client.HTTPConnection(host, self.address.port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, Any] | list[tuple[str, str]] | None = None,
        accept_json: bool = False,
    ) -> ApiResponse:
        body = urlencode(form, doseq=True).encode() if form is not None else None
        headers = {"Accept": "application/json"} if accept_json else {}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            reply = conn.getresponse()
            return ApiResponse(reply.status, reply.read())
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise ApiUnreachable(f"weavenet is not running (nothing answers at {self.address}: {exc})") from None
        except OSError as exc:
            raise ApiUnreachable(f"cannot reach weavenet at {self.address}: {exc}") from None
        finally:
            conn.close()
