"""The router's HTTP API: Weave Net's paths and formats, JSON for scripts, text for people.

Handlers only read state and call the router's control methods; they never block.
Bad input is a 400 with a one-line message; unknown status views are 404, as in Weave Net.
"""

from __future__ import annotations

from collections.abc import Awaitable
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Any

from weavenet.api import metrics
from weavenet.api.server import HttpError, Request, Response, Router
from weavenet.ipam import http as ipam_http
from weavenet.ipam.errors import IpamError
from weavenet.ipam.status import format_ipam_status
from weavenet.mesh import status_text
from weavenet.net import kernel_status
from weavenet.net.containers import AddressRequest, AttachError, Containers, ps_line
from weavenet.plugin.server import format_status as plugin_status

if TYPE_CHECKING:
    from weavenet.daemon import Node


def full_report(node: Node) -> dict[str, Any]:
    report = {"Ready": True, "Version": node.version, "Router": node.router.report()}
    if node.kernel is not None:
        report["KernelPath"] = kernel_status.report(node.kernel)
    if node.ipam is not None:
        report["IPAM"] = node.ipam.report()
    if node.plugin is not None:
        report["Plugin"] = node.plugin.report()
    return report


def status_page(node: Node) -> str:
    header = f"        Version: {node.version}\n\n"
    text = header + status_text.format_status(node.router.report())
    if node.kernel is not None:
        text += status_text.format_fast_path(kernel_status.report(node.kernel))
    if node.ipam is not None:
        text += "\n" + format_ipam_status(node.ipam.report())
    if node.plugin is not None:
        text += "\n" + plugin_status(node.plugin.report())
    return text


_VIEWS = {
    "peers": ("Peers", status_text.format_peers),
    "connections": ("Connections", status_text.format_connections),
    "targets": ("Targets", status_text.format_targets),
}


def build_api(node: Node) -> Router:
    api = Router()
    ipam_http.mount(api, node)  # first: its /status/ipam comes before /status/{view}

    @api.route("GET", "/status")
    async def status(request: Request) -> Response:
        if node.kernel is not None:
            await node.kernel.read_counters()
        if request.wants_json():
            return Response.json(full_report(node))
        return Response.text(status_page(node))

    @api.route("GET", "/status/{view}")
    async def status_view(request: Request) -> Response:
        view = request.params["view"]
        if view not in _VIEWS:
            raise HttpError(404, f"unknown status view {view!r}; try one of: {', '.join(_VIEWS)}")
        key, formatter = _VIEWS[view]
        report = node.router.report()
        if request.wants_json():
            return Response.json(report.get(key, []))
        return Response.text(formatter(report))

    @api.route("GET", "/report")
    async def report(request: Request) -> Response:
        if node.kernel is not None:
            await node.kernel.read_counters()
        return Response.json(full_report(node))

    @api.route("POST", "/connect")
    async def connect(request: Request) -> Response:
        peers = request.form().get("peer", [])
        errors = await node.router.connect(peers, replace=request.flag("replace"))
        if errors:
            raise HttpError(400, "; ".join(errors))
        return Response.empty(200)

    @api.route("POST", "/forget")
    async def forget(request: Request) -> Response:
        node.router.forget(request.form().get("peer", []))
        return Response.empty(200)

    @api.route("GET", "/metrics")
    async def metrics_page(request: Request) -> Response:
        samples = [*node.router.metrics(), *metrics.process_samples(node.started_at)]
        if node.kernel is not None:
            await node.kernel.read_counters()
            samples += kernel_status.metrics(node.kernel, node.overlay.stats() if node.overlay is not None else {})
        if node.ipam is not None:
            samples += node.ipam.metrics()
        return Response(200, metrics.render(samples).encode(), "text/plain; version=0.0.4; charset=utf-8")

    @api.route("POST", "/stop")
    async def stop(request: Request) -> Response:
        node.stop_requested.set()
        return Response.empty(204)

    mount_containers(api, node)
    return api


def _containers(node: Node) -> Containers:
    if node.containers is None:
        raise HttpError(503, "the router is still starting")
    return node.containers


def _address_requests(request: Request) -> list[AddressRequest]:
    try:
        return [AddressRequest.parse(text) for text in request.form().get("addr", [])]
    except AttachError as exc:
        raise HttpError(400, str(exc)) from None


def mount_containers(api: Router, node: Node) -> None:
    """attach, detach, expose, hide and ps: the host's side of the overlay."""

    async def guarded(call: Awaitable[list[IPv4Interface]]) -> Response:
        try:
            addresses = await call
        except (AttachError, IpamError) as exc:
            raise HttpError(400, str(exc)) from None
        return Response.text(" ".join(str(a) for a in addresses) + "\n")

    @api.route("POST", "/attach")
    async def attach(request: Request) -> Response:
        target = (request.form().get("target") or [""])[-1]
        multicast = not request.flag("no-multicast-route")
        return await guarded(_containers(node).attach(target, _address_requests(request), multicast_route=multicast))

    @api.route("POST", "/detach")
    async def detach(request: Request) -> Response:
        target = (request.form().get("target") or [""])[-1]
        return await guarded(_containers(node).detach(target, _address_requests(request)))

    @api.route("POST", "/expose")
    async def expose(request: Request) -> Response:
        return await guarded(
            _containers(node).expose(_address_requests(request), masquerade=not request.flag("skipNAT"))
        )

    @api.route("POST", "/expose/{ip}/{prefixlen:\\d+}")
    async def expose_weave_net_path(request: Request) -> Response:
        # Weave Net's path, kept for scripts that call the API directly.
        text = f"{request.params['ip']}/{request.params['prefixlen']}"
        try:
            requests = [AddressRequest.parse(text)]
        except AttachError as exc:
            raise HttpError(400, str(exc)) from None
        await guarded(_containers(node).expose(requests, masquerade=not request.flag("skipNAT")))
        return Response.empty(204)

    @api.route("POST", "/hide")
    async def hide(request: Request) -> Response:
        return await guarded(_containers(node).hide(_address_requests(request)))

    @api.route("GET", "/ps")
    async def ps(request: Request) -> Response:
        rows = await _containers(node).ps()
        if node.plugin is not None:
            rows += await node.plugin.ps()
        if request.wants_json():
            return Response.json(rows)
        return Response.text("".join(ps_line(row) + "\n" for row in rows))
