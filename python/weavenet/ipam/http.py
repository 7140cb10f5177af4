"""IPAM's HTTP routes, at Weave Net's paths (spec §3.11): /ip, /ring, /ipinfo, /peer, /status/ipam.

`mount(api, node)` adds them to the API router; `api/routes.py` calls it. Handlers validate the
path (id, address, prefix length) before touching the allocator, so a malformed request is a
400 with a one-line message and changes nothing. Allocator errors map to 400 (bad request or the
address is someone else's) or 503 (not ready, no space, timed out: try again later).
Waits are bounded: `?timeout=SECONDS` (default 30) on the calls that may wait.
"""

from __future__ import annotations

from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from weavenet.api.server import HttpError, Request, Response, Router
from weavenet.ipam.allocator import Allocator
from weavenet.ipam.errors import IpamError

DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 3600.0


def _ipam(node: Any) -> Allocator:
    allocator: Allocator | None = getattr(node, "ipam", None)
    if allocator is None:
        raise HttpError(404, "IPAM is disabled on this router (started with an empty --ipalloc-range)")
    return allocator


def _address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise HttpError(400, f"invalid IP address {text!r}: expected a dotted IPv4 address") from None


def _prefix_len(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 32:
        raise HttpError(400, f"invalid prefix length {text!r}: expected 0-32")
    return int(text)


def _subnet(ip: str, length: str) -> IPv4Network:
    address, prefix = _address(ip), _prefix_len(length)
    try:
        return IPv4Network((address, prefix))
    except ValueError:
        network = IPv4Network((address, prefix), strict=False)
        raise HttpError(400, f"invalid subnet {ip}/{length}: host bits set (did you mean {network}?)") from None


def _interface(ip: str, length: str) -> IPv4Interface:
    return IPv4Interface((_address(ip), _prefix_len(length)))


def _timeout(request: Request) -> float:
    values = request.query.get("timeout")
    if not values:
        return DEFAULT_TIMEOUT
    try:
        value = float(values[-1])
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT:
        raise HttpError(400, f"invalid timeout {values[-1]!r}: expected seconds, more than 0 and at most 3600")
    return value


def _checked_ident(request: Request) -> str:
    try:
        Allocator.check_ident(request.params["id"])
    except IpamError as exc:
        raise _error(exc) from None
    return request.params["id"]


def _error(exc: IpamError, prefix: str = "") -> HttpError:
    status = 503 if exc.kind in ("unavailable", "cancelled") else 400
    return HttpError(status, f"{prefix}{exc}")


def mount(api: Router, node: Any) -> None:
    """Add the IPAM routes to `api`; `node.ipam` is the Allocator (None: IPAM disabled)."""

    async def allocate(request: Request, subnet: IPv4Network | None) -> Response:
        ipam = _ipam(node)
        try:
            address = await ipam.allocate(
                request.params["id"], subnet, is_container=request.flag("check-alive"), timeout=_timeout(request)
            )
        except IpamError as exc:
            raise _error(exc) from None
        return Response.text(str(address))

    @api.route("POST", "/ip/{id}")
    async def allocate_default(request: Request) -> Response:
        return await allocate(request, None)

    @api.route("POST", "/ip/{id}/{ip}/{len}")
    async def allocate_in_subnet(request: Request) -> Response:
        return await allocate(request, _subnet(request.params["ip"], request.params["len"]))

    @api.route("PUT", "/ip/{id}/{ip}/{len}")
    async def claim(request: Request) -> Response:
        ipam = _ipam(node)
        address = _interface(request.params["ip"], request.params["len"])
        try:
            await ipam.claim(
                request.params["id"],
                address,
                is_container=request.flag("check-alive"),
                no_error_on_unknown=request.flag("noErrorOnUnknown"),
                timeout=_timeout(request),
            )
        except IpamError as exc:
            raise _error(exc, "Unable to claim: ") from None
        return Response.empty(204)

    def lookup(request: Request, subnet: IPv4Network) -> Response:
        ipam = _ipam(node)
        _checked_ident(request)
        return Response.text(" ".join(str(a) for a in ipam.lookup(request.params["id"], subnet)))

    @api.route("GET", "/ip/{id}")
    async def lookup_default(request: Request) -> Response:
        return lookup(request, _ipam(node).default_subnet)

    @api.route("GET", "/ip/{id}/{ip}/{len}")
    async def lookup_in_subnet(request: Request) -> Response:
        return lookup(request, _subnet(request.params["ip"], request.params["len"]))

    @api.route("GET", "/ip")
    async def dump(request: Request) -> Response:
        owned = _ipam(node).owned()
        return Response.json(
            {"owned": [{"containerid": ident, "addrs": [str(a) for a in addrs]} for ident, addrs in owned.items()]}
        )

    @api.route("DELETE", "/ip/{id}")
    async def delete(request: Request) -> Response:
        ident = _checked_ident(request)
        if not await _ipam(node).free(ident):
            raise HttpError(400, f"Delete: no addresses for {ident}")
        return Response.empty(204)

    @api.route("DELETE", "/ip/{id}/{ip}")
    async def free(request: Request) -> Response:
        ident, address = _checked_ident(request), _address(request.params["ip"])
        if not await _ipam(node).free(ident, address):
            raise HttpError(400, f"Unable to free: {address} is not held by {ident}")
        return Response.empty(204)

    @api.route("GET", "/ring")
    async def prime(request: Request) -> Response:
        try:
            await _ipam(node).prime(timeout=_timeout(request))
        except IpamError as exc:
            raise _error(exc) from None
        return Response.empty(200)

    @api.route("GET", "/ipinfo/defaultsubnet")
    async def default_subnet(request: Request) -> Response:
        return Response.text(str(_ipam(node).default_subnet))

    @api.route("GET", "/ipinfo/tracker")
    async def tracker(request: Request) -> Response:
        return Response.text("none")

    @api.route("DELETE", "/peer")
    async def leave(request: Request) -> Response:
        try:
            await _ipam(node).leave()
        except IpamError as exc:
            raise _error(exc) from None
        return Response.empty(204)

    @api.route("DELETE", "/peer/{name}")
    async def rmpeer(request: Request) -> Response:
        try:
            message = await _ipam(node).rmpeer(request.params["name"])
        except IpamError as exc:
            raise _error(exc) from None
        return Response.text(message + "\n")

    @api.route("GET", "/status/ipam")
    async def status_ipam(request: Request) -> Response:
        ipam = _ipam(node)
        if request.wants_json():
            return Response.json(ipam.report())
        return Response.text(ipam.status_text())
