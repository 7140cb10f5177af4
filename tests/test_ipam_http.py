"""IPAM's HTTP API at Weave Net's paths, as scripts and the weave-style CLI call it.

Every malformed id, CIDR or address is a 400 with a one-line message and changes nothing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.ipam_cluster import Cluster, scenario
from weavenet.api.server import HttpError, Request, Response, Router
from weavenet.ipam import http as ipam_http


async def call(api: Router, method: str, target: str, accept: str = "") -> Response:
    url = urlsplit(target)
    request = Request(method, url.path, parse_qs(url.query, keep_blank_values=True), {"accept": accept}, b"")
    try:
        return await api.dispatch(request)
    except HttpError as exc:
        return Response.text(exc.message, exc.status)


def text(response: Response) -> str:
    return response.body.decode()


@scenario()
async def test_the_ip_paths(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, init="consensus=1")
    api = Router()
    ipam_http.mount(api, SimpleNamespace(ipam=alloc))

    r = await call(api, "POST", "/ip/c1")
    assert (r.status, text(r)) == (200, "10.32.0.1/12")
    assert text(await call(api, "POST", "/ip/c1")) == "10.32.0.1/12"
    r = await call(api, "POST", "/ip/c1/10.40.0.0/16")
    assert (r.status, text(r)) == (200, "10.40.0.1/16")
    assert text(await call(api, "GET", "/ip/c1")) == "10.32.0.1/12 10.40.0.1/16"
    assert text(await call(api, "GET", "/ip/c1/10.40.0.0/16")) == "10.40.0.1/16"
    assert text(await call(api, "GET", "/ip/nobody")) == ""
    r = await call(api, "PUT", "/ip/c2/10.32.5.5/12?check-alive=true")
    assert r.status == 204
    r = await call(api, "PUT", "/ip/c3/10.32.5.5/12")
    assert (r.status, text(r)) == (400, "Unable to claim: address 10.32.5.5 is already owned by c2")
    owned = json.loads(text(await call(api, "GET", "/ip")))
    assert owned == {
        "owned": [
            {"containerid": "c1", "addrs": ["10.32.0.1/12", "10.40.0.1/16"]},
            {"containerid": "c2", "addrs": ["10.32.5.5/12"]},
        ]
    }
    assert (await call(api, "DELETE", "/ip/c1/10.40.0.1")).status == 204
    r = await call(api, "DELETE", "/ip/c1/10.40.0.1")
    assert (r.status, text(r)) == (400, "Unable to free: 10.40.0.1 is not held by c1")
    assert (await call(api, "DELETE", "/ip/c1")).status == 204
    r = await call(api, "DELETE", "/ip/c1")
    assert (r.status, text(r)) == (400, "Delete: no addresses for c1")
    assert (await call(api, "GET", "/ring")).status == 200
    assert text(await call(api, "GET", "/ipinfo/defaultsubnet")) == "10.32.0.0/12"
    status = text(await call(api, "GET", "/status/ipam"))
    assert status.startswith("0e:00:00:00:00:01(host0)") and "1048576 IPs (100.0% of total) (1 active)" in status
    report = json.loads(text(await call(api, "GET", "/status/ipam", accept="application/json")))
    assert report["Status"] == "ready" and report["ActiveIPs"] == 1
    assert (await call(api, "PATCH", "/ip/c1")).status == 405


MALFORMED = [
    ("POST", "/ip/c1/10.32.0.1/12", "invalid subnet 10.32.0.1/12: host bits set (did you mean 10.32.0.0/12?)"),
    ("POST", "/ip/c1/10.32.0.0/33", "invalid prefix length '33': expected 0-32"),
    ("POST", "/ip/c1/10.32.0/12", "invalid IP address '10.32.0': expected a dotted IPv4 address"),
    ("POST", "/ip/c1/10.32.0.0/31", "subnet 10.32.0.0/31 is too small to allocate in: use /30 or larger"),
    ("POST", "/ip/c1/192.168.0.0/24", "subnet 192.168.0.0/24 is outside the allocation range 10.32.0.0/12"),
    ("POST", "/ip/c1/::1/12", "invalid IP address '::1'"),
    ("POST", "/ip/c1?timeout=soon", "invalid timeout 'soon'"),
    ("POST", "/ip/%20space", "invalid id ' space'"),
    ("PUT", "/ip/c1/10.32.0.300/12", "invalid IP address '10.32.0.300'"),
    ("PUT", "/ip/c1/10.32.0.3/x", "invalid prefix length 'x'"),
    ("GET", "/ip/c1/10.32.0.0/-1", "invalid prefix length '-1'"),
    ("DELETE", "/ip/c1/not-an-ip", "invalid IP address 'not-an-ip'"),
    ("DELETE", "/ip/%09", "invalid id '\\t'"),
    ("GET", "/ring?timeout=0", "invalid timeout '0'"),
]


@scenario()
async def test_malformed_requests_are_400_and_change_nothing(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, init="consensus=1")
    await alloc.allocate("c1")
    before = (alloc.owned(), alloc.ring.to_bytes())
    api = Router()
    ipam_http.mount(api, SimpleNamespace(ipam=alloc))
    for method, path, message in MALFORMED:
        r = await call(api, method, path)
        assert r.status == 400, (path, text(r))
        assert text(r).startswith(message), (path, text(r))
        assert "\n" not in text(r).rstrip("\n")
        assert (alloc.owned(), alloc.ring.to_bytes()) == before, path


@scenario()
async def test_waits_are_bounded_and_answer_503(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    alloc = await cluster.start(0, init="consensus=3")
    api = Router()
    ipam_http.mount(api, SimpleNamespace(ipam=alloc))
    r = await call(api, "POST", "/ip/c1?timeout=0.3")
    assert (r.status, text(r)) == (
        503,
        "IPAM not ready: waiting for consensus, 1 of 2 peers seen (gave up after 0.3s)",
    )
    r = await call(api, "GET", "/ring?timeout=0.2")
    assert r.status == 503
    assert (await call(api, "DELETE", "/peer/host9")).status == 400


@scenario()
async def test_ipam_disabled_is_a_clear_404(cluster: Cluster, caplog: pytest.LogCaptureFixture):
    api = Router()
    ipam_http.mount(api, SimpleNamespace(ipam=None))
    r = await call(api, "POST", "/ip/c1")
    assert (r.status, text(r)) == (404, "IPAM is disabled on this router (started with an empty --ipalloc-range)")
