"""Freeing the addresses of containers that ended, whether the router was down or not, and nothing else.

No host, no Docker: a stand-in for Docker's API answers the listings and streams events, an
in-memory allocator stands in for IPAM, and the plugin service's start-up pass (reclaim, then
prune) and its event watcher run on trio's mock clock. The Docker client's stream reader is
checked against a socket that speaks as dockerd does. Under the real dockerd: test_plugin_docker.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from weavenet.config import Settings
from weavenet.plugin import prune, watcher
from weavenet.plugin.docker_api import DockerClient, DockerError
from weavenet.plugin.docker_network import DockerInventory, inventory
from weavenet.plugin.options import DriverError
from weavenet.plugin.server import PluginService
from weavenet.plugin.state import AddressBook
from weavenet.store import Store

RANGE = IPv4Network("10.32.0.0/12")
GONE = "a" * 64
ALIVE = "b" * 64
NET = "n" * 64


def cidr(text: str) -> IPv4Interface:
    return IPv4Interface(f"{text}/12")


class HoldingAllocator:
    """IPAM as the prune sees it: idents, their addresses, and whether they were allocated as containers."""

    def __init__(self) -> None:
        self.range = RANGE
        self.default_subnet = RANGE
        self.held: dict[str, list[IPv4Interface]] = {}
        self.containers: set[str] = set()
        self.claims: list[tuple[str, IPv4Interface]] = []

    def hold(self, ident: str, address: str, *, is_container: bool = False) -> None:
        self.held.setdefault(ident, []).append(cidr(address))
        if is_container:
            self.containers.add(ident)

    async def allocate(self, ident: str, subnet: IPv4Network | None = None, **_: Any) -> IPv4Interface:
        raise AssertionError("the prune never allocates")

    async def claim(self, ident: str, address: IPv4Interface, **_: Any) -> None:
        self.claims.append((ident, address))
        self.held.setdefault(str(address.ip) if ident == "_" else ident, []).append(address)

    async def free(self, ident: str, address: IPv4Address | None = None) -> list[IPv4Interface]:
        if ident == "_" and address is not None:
            ident = str(address)
        released = [c for c in self.held.get(ident, []) if address is None or c.ip == address]
        self.held[ident] = [c for c in self.held.get(ident, []) if c not in released]
        if not self.held[ident]:
            del self.held[ident]
        return released

    def owned(self) -> dict[str, list[IPv4Interface]]:
        return {k: list(v) for k, v in self.held.items()}

    def owned_by_containers(self) -> dict[str, list[IPv4Interface]]:
        return {k: list(v) for k, v in self.held.items() if k in self.containers}


class FakeDocker:
    """Docker's answers to the listings the plugin makes; `fail` makes every call fail with that status."""

    def __init__(self, containers: list[dict[str, Any]], networks: list[dict[str, Any]], **options: Any) -> None:
        self.containers = containers
        self.networks = networks
        self.fail: int | None = options.get("fail")
        self.calls = 0

    async def call(self, method: str, path: str, *, body: Any = None, query: dict[str, str] | None = None) -> Any:
        self.calls += 1
        if self.fail is not None:
            raise DockerError(f"{method} {path}: failed", self.fail)
        if path == "/containers/json":
            return self.containers if (query or {}).get("all") == "1" else [c for c in self.containers if c["Running"]]
        if path == "/networks":
            drivers = json.loads((query or {}).get("filters", "{}")).get("driver")
            return [n for n in self.networks if drivers is None or n["Driver"] in drivers]
        raise AssertionError(f"unexpected call {method} {path}")

    async def list_containers(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/containers/json")

    async def inspect_network(self, name_or_id: str) -> dict[str, Any] | None:
        return None


def container(cid: str, address: str = "", *, running: bool = True, network: str = NET) -> dict[str, Any]:
    networks = {"net": {"NetworkID": network, "IPAddress": address, "IPPrefixLen": 12, "EndpointID": "e" * 64}}
    return {"Id": cid, "Running": running, "NetworkSettings": {"Networks": networks if address else {}}}


def network(
    gateway: str = "", aux: dict[str, str] | None = None, *, driver: str = "weavemesh", subnet: str = "10.32.0.0/12"
) -> dict[str, Any]:
    config = {"Subnet": subnet, "Gateway": gateway, "AuxiliaryAddresses": aux or {}}
    return {"Id": NET, "Name": "weave", "Driver": driver, "Scope": "local", "IPAM": {"Config": [config]}}


def swarm_network(subnet: str | None) -> dict[str, Any]:
    return {
        "Id": "s" * 25,
        "Name": "svc",
        "Driver": "weave",
        "Scope": "swarm",
        "IPAM": {"Config": [{"Subnet": subnet}]},
    }


def stock(
    ids: set[str] = frozenset(), addresses: set[str] = frozenset(), swarm: tuple[str, ...] = ()
) -> DockerInventory:
    return DockerInventory(
        frozenset(ids), frozenset(IPv4Address(a) for a in addresses), tuple(IPv4Network(n) for n in swarm)
    )


# --- the rules ---


def test_only_container_ids_docker_does_not_know_are_gone():
    holdings = {
        GONE: [cidr("10.32.0.1")],
        ALIVE: [cidr("10.32.0.2")],
        "netns:c1": [cidr("10.32.0.3")],
        "weave:expose": [cidr("10.32.0.4")],
        "a" * 63: [cidr("10.32.0.5")],  # not a full id
        "A" * 64: [cidr("10.32.0.6")],  # Docker ids are lower case
    }
    assert prune.gone_containers(holdings, frozenset({ALIVE})) == {GONE: [cidr("10.32.0.1")]}


def test_lost_releases_are_the_books_leftovers_no_one_in_docker_uses():
    owned = {a: [cidr(a)] for a in ("10.32.0.1", "10.32.0.2", "10.32.0.3")}
    owned[GONE] = [cidr("10.32.0.4")]  # filed under a container id: not one Docker got from the driver
    leftovers = {"10.32.0.1", "10.32.0.2", "10.32.0.4", "10.32.0.9", "garbage"}
    docker = stock(addresses={"10.32.0.2"})
    assert prune.lost_releases(leftovers, owned, docker) == [IPv4Address("10.32.0.1")]
    swarm = stock(swarm=("10.32.0.0/31",))  # service VIPs in a swarm network are in no container list
    assert prune.lost_releases(leftovers, owned, swarm) == [IPv4Address("10.32.0.2")]


def test_docker_inventory_counts_endpoints_gateways_and_aux_addresses_of_every_container():
    docker = FakeDocker(
        [container(ALIVE, "10.32.0.2"), container(GONE, "10.32.0.3", running=False)],
        [
            network("10.32.0.1", {"host": "10.32.0.9"}),
            network("fd00::1", driver="bridge"),
            swarm_network("10.0.0.0/24"),
        ],
    )
    found = trio.run(inventory, docker)
    assert found.container_ids == {ALIVE, GONE}
    assert found.addresses == {IPv4Address(a) for a in ("10.32.0.1", "10.32.0.2", "10.32.0.3", "10.32.0.9")}
    assert found.swarm_subnets == (IPv4Network("10.0.0.0/24"),)
    assert found.in_use(IPv4Address("10.0.0.7")) and not found.in_use(IPv4Address("10.32.0.7"))
    unreadable = FakeDocker([], [swarm_network(None)])
    assert trio.run(inventory, unreadable).in_use(IPv4Address("10.32.0.7"))  # could be anywhere


def test_docker_inventory_refuses_an_answer_it_cannot_read():
    docker = FakeDocker([{"NoId": True}], [])
    with pytest.raises(DockerError, match="unexpected shape"):
        trio.run(inventory, docker)


def test_the_address_book_survives_a_restart(tmp_path: Path):
    store = Store(tmp_path)
    try:
        book = AddressBook(store).load()
        book.add("10.32.0.1")
        book.add("10.32.0.2")
        book.discard("10.32.0.2")
        assert book.leftovers() == set()  # handed out in this run: in use
        again = AddressBook(store).load()
        assert again.leftovers() == {"10.32.0.1"}
        again.mention("10.32.0.1")
        assert again.leftovers() == set()
    finally:
        store.close()


# --- the pass the plugin makes after a start ---


def service(allocator: HoldingAllocator, docker: FakeDocker, book: AddressBook | None = None) -> PluginService:
    settings = Settings(state_dir=Path("/nonexistent"), docker_api=None)
    plugin = PluginService(
        settings,
        Path("/nonexistent"),
        store=None,
        allocator=lambda: allocator,
        docker=docker,  # type: ignore[arg-type]
    )
    if book is not None:
        plugin.book = book
        for driver in plugin.drivers:
            driver.book = book
    return plugin


def tidy(plugin: PluginService, *, limit: float = 300.0) -> None:
    async def main() -> None:
        with trio.move_on_after(limit):
            await plugin._tidy_after_start(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_after_a_start_gone_containers_and_lost_releases_are_freed_and_nothing_in_use():
    allocator = HoldingAllocator()
    allocator.hold(GONE, "10.32.0.10", is_container=True)  # attached, then removed while we were down
    allocator.hold(ALIVE, "10.32.0.11", is_container=True)  # attached, stopped, still known to Docker
    allocator.hold("9" * 64, "10.32.0.12")  # a container id, but not allocated as a container (CNI)
    allocator.hold("netns:c1", "10.32.0.13", is_container=True)
    for address in ("10.32.0.1", "10.32.0.2", "10.32.0.3", "10.32.0.4", "10.32.0.5"):
        allocator.hold(address, address)  # filed under their own text
    book = AddressBook(held={"10.32.0.1", "10.32.0.2", "10.32.0.3", "10.32.0.4", "10.32.0.99"})
    book.mention("10.32.0.4")  # Docker plugged it into an endpoint after our start
    docker = FakeDocker(
        [container(ALIVE, running=False), container("c" * 64, "10.32.0.2"), container("d" * 64, "10.32.0.7")],
        [network("10.32.0.3")],  # 10.32.0.3: a real --gateway
    )
    plugin = service(allocator, docker, book)
    tidy(plugin)
    held = allocator.owned()
    assert GONE not in held and "10.32.0.1" not in held  # the only two freed
    assert plugin.pruned == {"Containers": 1, "Addresses": 1, "Endpoints": 0}
    for kept in (ALIVE, "9" * 64, "netns:c1", "10.32.0.2", "10.32.0.3", "10.32.0.4", "10.32.0.5"):
        assert kept in held, kept
    assert allocator.claims == [("_", cidr("10.32.0.7"))]  # the running container IPAM did not know: reclaimed
    assert book.held == {"10.32.0.2", "10.32.0.3", "10.32.0.4", "10.32.0.7"}  # .99: IPAM had let go of it


@pytest.mark.parametrize("status", [0, 500], ids=["unreachable", "error"])
def test_nothing_is_pruned_unless_docker_answers(status: int):
    allocator = HoldingAllocator()
    allocator.hold(GONE, "10.32.0.10", is_container=True)
    allocator.hold("10.32.0.1", "10.32.0.1")
    docker = FakeDocker([], [], fail=status)
    plugin = service(allocator, docker, AddressBook(held={"10.32.0.1"}))
    tidy(plugin, limit=600.0)
    assert set(allocator.owned()) == {GONE, "10.32.0.1"}
    assert docker.calls > (3 if status == 0 else 0)  # unreachable: it kept asking


def test_a_lost_release_waits_for_dockers_retries_to_be_over():
    allocator = HoldingAllocator()
    allocator.hold("10.32.0.1", "10.32.0.1")
    plugin = service(allocator, FakeDocker([], []), AddressBook(held={"10.32.0.1"}))
    tidy(plugin, limit=prune.SETTLE - 1)
    assert "10.32.0.1" in allocator.owned()
    tidy(plugin, limit=prune.SETTLE + 1)
    assert "10.32.0.1" not in allocator.owned()


def test_create_endpoint_with_a_leftover_address_keeps_it():
    allocator = HoldingAllocator()
    allocator.hold("10.32.0.1", "10.32.0.1")
    book = AddressBook(held={"10.32.0.1"})
    plugin = service(allocator, FakeDocker([], []), book)
    mesh = next(d for d in plugin.drivers if d.name == "weavemesh")
    endpoint = {"NetworkID": NET, "EndpointID": "e" * 64, "Interface": {"Address": "10.32.0.1/12"}}
    with pytest.raises(DriverError, match="unknown network"):  # fails here, yet Docker said it uses .1
        trio.run(mesh.create_endpoint, endpoint)
    assert book.leftovers() == set()
    tidy(plugin)
    assert "10.32.0.1" in allocator.owned()


# --- while the router runs: Docker's events ---


class StreamingDocker(FakeDocker):
    """Docker's event stream: each `follow` opens with the containers of one batch, replays its
    events, then Docker ends the stream."""

    def __init__(self, batches: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]) -> None:
        super().__init__([], [])
        self.batches = batches

    async def follow(self, path: str, handle: Any, *, query: dict[str, str] | None = None, on_open: Any = None) -> None:
        assert path == "/events" and json.loads((query or {})["filters"]) == watcher.EVENTS
        if not self.batches:
            await trio.sleep_forever()
        self.containers, events = self.batches.pop(0)
        await on_open()
        for event in events:
            await handle(event)


def destroyed(cid: str) -> dict[str, Any]:
    return {"status": "destroy", "id": cid, "Type": "container", "Action": "destroy", "Actor": {"ID": cid}}


def test_a_destroyed_container_gives_back_what_it_held_and_a_reopened_stream_catches_up():
    allocator = HoldingAllocator()
    allocator.hold(GONE, "10.32.0.10", is_container=True)
    allocator.hold("9" * 64, "10.32.0.12")  # not held as a container (CNI): Docker's events are not its life
    allocator.hold("c" * 64, "10.32.0.13", is_container=True)  # destroyed while the stream was down
    allocator.hold(ALIVE, "10.32.0.11", is_container=True)
    everyone = [container(c) for c in (GONE, "9" * 64, "c" * 64, ALIVE)]
    events = [destroyed(GONE), destroyed("9" * 64), {"Type": "container", "Action": "die", "Actor": {"ID": ALIVE}}]
    docker = StreamingDocker([(everyone, events), ([container(ALIVE)], [])])
    follower = watcher.ContainerWatcher(docker, lambda: allocator)  # type: ignore[arg-type]

    async def main() -> None:
        with trio.move_on_after(30):
            await follower.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert set(allocator.owned()) == {ALIVE, "9" * 64}
    assert follower.opened == 2 and follower.freed == 2


async def serve_unix(nursery: trio.Nursery, path: Path, serve: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
    """A stand-in dockerd on the unix socket `path` (the real one cannot be made to answer like
    this on purpose): `serve` answers each connection."""
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen()
    nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(listener)])


def test_the_event_stream_is_read_line_by_line_as_docker_sends_it(tmp_path: Path):
    """DockerClient.follow against a unix socket that streams chunked JSON lines, as dockerd does."""
    path = tmp_path / "docker.sock"
    lines = [json.dumps(destroyed(GONE)), json.dumps(destroyed(ALIVE))]
    got: list[Any] = []

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = (lines[0] + "\n" + lines[1][:20]).encode()
        rest = (lines[1][20:] + "\n").encode()
        await stream.send_all(head + b"%x\r\n%s\r\n" % (len(body), body))
        await trio.sleep(0.1)  # the second value arrives in two pieces
        await stream.send_all(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await serve_unix(nursery, path, serve)
            opened: list[bool] = []

            async def handle(value: Any) -> None:
                got.append(value)

            async def on_open() -> None:
                opened.append(True)

            await DockerClient(str(path)).follow("/events", handle, on_open=on_open)
            assert opened == [True]
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got == [destroyed(GONE), destroyed(ALIVE)]


def test_a_refused_event_stream_is_an_error_naming_dockers_message(tmp_path: Path):
    path = tmp_path / "docker.sock"

    async def serve(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        body = b'{"message": "invalid filter"}'
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await serve_unix(nursery, path, serve)

            async def handle(value: Any) -> None:
                raise AssertionError("no value expected")

            with pytest.raises(DockerError, match="invalid filter"):
                await DockerClient(str(path)).follow("/events", handle)
            nursery.cancel_scope.cancel()

    trio.run(main)
