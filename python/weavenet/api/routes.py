"""The router's HTTP API: Weave Net's paths and formats, JSON for scripts, text for people.

Handlers only read state and call the router's control methods; they never block.
Bad input is a 400 with a one-line message; unknown status views are 404, as in Weave Net.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weavenet.api import metrics
from weavenet.api.server import HttpError, Request, Response, Router
from weavenet.mesh import status_text

if TYPE_CHECKING:
    from weavenet.daemon import Node


def full_report(node: Node) -> dict[str, Any]:
    return {"Ready": True, "Version": node.version, "Router": node.router.report()}


def status_page(node: Node) -> str:
    header = f"        Version: {node.version}\n\n"
    return header + status_text.format_status(node.router.report())


_VIEWS = {
    "peers": ("Peers", status_text.format_peers),
    "connections": ("Connections", status_text.format_connections),
    "targets": ("Targets", status_text.format_targets),
}


def build_api(node: Node) -> Router:
    api = Router()

    @api.route("GET", "/status")
    async def status(request: Request) -> Response:
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
        return Response(200, metrics.render(samples).encode(), "text/plain; version=0.0.4; charset=utf-8")

    @api.route("POST", "/stop")
    async def stop(request: Request) -> Response:
        node.stop_requested.set()
        return Response.empty(204)

    return api
