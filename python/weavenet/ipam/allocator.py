"""The IPAM allocator: hands out addresses from this peer's share of the ring, asks peers for more.

What it is for: allocate (lowest free address in the default subnet or a given CIDR), claim a
given address (Weave Net's claim rules), free, look up; keep the ring (`weavenet._fastdp.Ring`)
in step with every peer over the mesh's "ipam" gossip channel; seed the ring by consensus, a seed
list, or by observing; persist the ring and the addresses held in one transaction per change;
take over a dead peer's ranges (`rmpeer`) and hand ours on when leaving (`leave`).

What it must never do: hand out an address twice (not across a restart, not across peers), block
a caller forever (every wait has a deadline and ends in a one-line `IpamError` that says what it
was waiting for), let a malformed or foreign gossip message change anything, or drop a mesh
connection over an IPAM disagreement (mismatched rings are refused and shown in status instead).

Concurrency: everything runs on the trio loop and changes state synchronously between awaits, so
no locks. Callers that cannot finish at once (no ring yet, no free space here) loop: try, then
wait for a state change or a tick, then try again, under their own deadline. `run` drives the
timers: consensus re-proposals, observer requests, confirmations of takeovers, deferred claims.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any

import trio

from weavenet._fastdp import Ring, RingError, RingMismatchError
from weavenet.config import IpallocInit, Settings
from weavenet.ipam import status as status_views
from weavenet.ipam import wire
from weavenet.ipam.consensus import Paxos, quorum_for
from weavenet.ipam.errors import IpamError
from weavenet.ipam.persist import Change, IpamStore
from weavenet.mesh.gossip import GossipData, OpaqueGossipData, UnknownRouteError
from weavenet.mesh.peer_name import PeerName

if TYPE_CHECKING:
    from weavenet.mesh.router import Router
    from weavenet.store import Store

log = logging.getLogger("weavenet.ipam")

ANONYMOUS = "_"  # Weave Net's "no ident": the address is filed under its own text
MAX_IDENT = 256
MAX_SUBNET_PREFIX = 30  # a subnet to allocate in has at least 4 addresses
MAX_LOGGED_REJECTIONS = 256

__all__ = ["ANONYMOUS", "Allocator", "IpamError", "IpamTimings"]


@dataclass(frozen=True)
class IpamTimings:
    """Intervals in seconds. Defaults are Weave Net's; tests use `fast()`."""

    tick: float = 5.0  # retry pending work, re-propose, re-ask peers
    confirm_timeout: float = 10.0  # how long rmpeer and reset wait for peers to confirm
    claim_tries: int = 5  # asks of an unreachable or silent owner before a claim fails

    @classmethod
    def fast(cls) -> IpamTimings:
        return cls(tick=0.1, confirm_timeout=5.0)


@dataclass
class _Holding:
    is_container: bool
    addresses: list[IPv4Interface] = field(default_factory=list)


@dataclass
class _Op:
    """One caller waiting: what it last waited for, whom it asked and when."""

    kind: str
    started: float
    reason: str = "IPAM not ready"
    asked: dict[int, float] = field(default_factory=dict)
    tries: int = 0


@dataclass
class _Takeover:
    """An rmpeer in progress: the tokens we took (token → our version), not allocated from until
    every reachable IPAM peer has shown us a ring holding our takeover (or a winner's)."""

    peer: int
    tokens: dict[int, int]
    acked: set[int] = field(default_factory=set)
    lost_to: set[int] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "tokens": [[t, v] for t, v in sorted(self.tokens.items())]}


@dataclass
class _Handover:
    """A reset in progress: our tokens now belong to `heir`; done when the heir shows them."""

    heir: int
    tokens: dict[int, int]
    done: trio.Event = field(default_factory=trio.Event)


def _fmt_addr(value: int) -> str:
    return str(IPv4Address(value)) if value < 1 << 32 else "255.255.255.255+1"


def _fmt_range(start: int, end: int) -> str:
    size = end - start
    if size & (size - 1) == 0 and start % size == 0:
        return str(IPv4Network((start, 32 - size.bit_length() + 1)))
    return f"{_fmt_addr(start)}-{_fmt_addr(end - 1)}"


def _subtract(pieces: list[tuple[int, int]], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    for hs, he in holes:
        out = []
        for s, e in pieces:
            if he <= s or e <= hs:
                out.append((s, e))
                continue
            if s < hs:
                out.append((s, hs))
            if he < e:
                out.append((he, e))
        pieces = out
    return pieces


class IpamGossipData:
    """Our full IPAM state, encoded when a connection is ready to send it (so always the newest)."""

    def __init__(self, allocator: Allocator, *, want_ring: bool = False) -> None:
        self._allocator = allocator
        self.want_ring = want_ring

    def merge(self, other: IpamGossipData) -> IpamGossipData:
        self.want_ring = self.want_ring or other.want_ring
        return self

    def encode(self) -> list[bytes]:
        return [wire.encode_state(self._allocator._state(want_ring=self.want_ring))]


class Allocator:
    """This peer's IPAM. Construct before the router serves (it registers the gossip channel)."""

    def __init__(
        self,
        router: Router,
        store: Store,
        *,
        ipalloc_range: IPv4Network,
        default_subnet: IPv4Network | None = None,
        init: IpallocInit | None = None,
        targets: int = 0,
        timings: IpamTimings | None = None,
        pre_claims: Callable[[], list[tuple[str, IPv4Interface]]] | None = None,
    ) -> None:
        self.range = ipalloc_range
        self.default_subnet = default_subnet or ipalloc_range
        self.init = init or IpallocInit()
        self.quorum = quorum_for(self.init.quorum, targets)
        self.timings = timings or IpamTimings()
        self._router = router
        self._us = int(router.name)
        self._db = IpamStore(store)
        self._pre_claims = pre_claims
        start = int(ipalloc_range.network_address)
        self._start, self._end = start, start + ipalloc_range.num_addresses
        self.ring = Ring(self._start, self._end, self._us)
        self._seeds: tuple[int, ...] = ()
        self._paxos: Paxos | None = None
        self._proposing = False
        self._last_paxos_change = 0.0
        self._next_propose = 0.0
        self._want_ring = False
        self._nicknames: dict[int, str] = {}
        self._owned: dict[str, _Holding] = {}
        self._deferred: list[tuple[str, IPv4Interface, bool]] = []
        self._denials: list[tuple[int, int, int, float]] = []  # (start, end, peer, when)
        self._takeovers: list[_Takeover] = []
        self._handover: _Handover | None = None
        self._leaving = False
        self._ipam_peers: set[int] = set()  # peers that sent us valid IPAM state for our range
        self._mismatches: dict[int, str] = {}
        self._logged: set[tuple[int, str]] = set()
        self._rejected = 0
        self._disputed_logged: set[tuple[int, int]] = set()
        self._ops: dict[int, _Op] = {}
        self._changed = trio.Event()
        self._scan_from: dict[tuple[int, int], int] = {}  # see _allocate_avoiding_edges
        self._channel = router.new_gossip_channel(wire.CHANNEL, self)
        self._restore()
        router.subscribe_routes(lambda _routes: self._on_routes())

    @classmethod
    def from_settings(
        cls,
        router: Router,
        store: Store,
        settings: Settings,
        *,
        pre_claims: Callable[[], list[tuple[str, IPv4Interface]]] | None = None,
    ) -> Allocator:
        assert settings.ipalloc_range is not None
        return cls(
            router,
            store,
            ipalloc_range=settings.ipalloc_range,
            default_subnet=settings.default_subnet,
            init=settings.ipalloc_init,
            targets=len(settings.peers),
            pre_claims=pre_claims,
        )

    # =============================================================================================
    # Start-up: restore what the last run persisted

    def _identity(self) -> dict[str, Any]:
        return {"peer": str(PeerName(self._us)), "range": str(self.range)}

    def _restore(self) -> None:
        saved = self._db.load()
        identity = self._identity()
        if saved.identity != identity:
            if saved.identity is not None:
                old_peer, old_range = saved.identity.get("peer"), saved.identity.get("range")
                if old_peer != identity["peer"]:
                    log.warning(
                        "persisted IPAM data belongs to peer %s, not %s: discarding it", old_peer, identity["peer"]
                    )
                else:
                    log.warning(
                        "persisted IPAM data is for range %s but --ipalloc-range is %s: discarding it",
                        old_range,
                        identity["range"],
                    )
            self._db.wipe(identity)
            saved = self._db.load()
        if saved.ring is not None:
            try:
                restored = Ring.from_bytes(saved.ring)
                if restored.peer != self._us or (restored.start, restored.end) != (self._start, self._end):
                    raise RingError("the persisted ring belongs to another peer or range")
                self.ring.merge(restored)
            except RingError as exc:
                log.warning("persisted IPAM ring is unusable (%s): discarding it", exc)
                self.ring = Ring(self._start, self._end, self._us)
        meta = saved.meta
        seeds = meta.get("seeds")
        if isinstance(seeds, list) and all(isinstance(s, int) for s in seeds):
            self._seeds = tuple(seeds)
        nicknames = meta.get("nicknames")
        if isinstance(nicknames, dict):
            self._nicknames = {int(k): str(v) for k, v in nicknames.items() if str(k).isdigit()}
        for item in meta.get("takeovers") or []:
            try:
                tokens = {int(t): int(v) for t, v in item["tokens"]}
                self._takeovers.append(_Takeover(int(item["peer"]), tokens))
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring an unreadable persisted takeover record")
        if self.ring.is_empty() and self.init.mode == "consensus":
            nodes = {}
            if meta.get("paxos") is not None:
                try:
                    nodes = Paxos.nodes_from_json(meta["paxos"])
                except ValueError as exc:
                    log.warning("persisted consensus state is unreadable (%s): starting afresh", exc)
            self._paxos = Paxos(self._us, self.quorum, nodes)
        for ident, cidr, is_container in saved.owned:
            self._hold(ident, cidr, is_container)
            if cidr.ip not in self.range:
                continue
            if self.ring.is_empty() or self.ring.owner(int(cidr.ip)) != self._us:
                self._deferred.append((ident, cidr, is_container))  # claimed (or asked for) later
                continue
            self.ring.claim_address(int(cidr.ip))
        if self.ring.is_empty() and self.init.mode == "seed":
            self._seed_ring(tuple(int(s) for s in self.init.seeds), "the seed list")
        elif not self.ring.is_empty():
            held = sum(len(h.addresses) for h in self._owned.values())
            log.info(
                "IPAM restored: range %s, %d ring entries, %d addresses held",
                self.range,
                len(self.ring.entries()),
                held,
            )
            self._save()

    # =============================================================================================
    # Running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Timers and retries until cancelled: consensus, observer requests, confirmations, claims."""
        async with trio.open_nursery() as nursery:
            if self._pre_claims is not None:
                nursery.start_soon(self._run_pre_claims)
            task_status.started()
            while True:
                await trio.sleep(self.timings.tick)
                self._tick()

    async def _run_pre_claims(self) -> None:
        assert self._pre_claims is not None
        try:
            found = await trio.to_thread.run_sync(self._pre_claims)
        except OSError as exc:
            log.warning("could not scan for addresses in use: %s", exc)
            return
        for ident, cidr in found:
            if cidr.ip in self.range and self._holder_of(cidr.ip) is None:
                log.info("reclaiming %s for %s (found in use at start)", cidr, ident)
                self._deferred.append((ident, cidr, False))
        self._retry_deferred()

    def _tick(self) -> None:
        now = trio.current_time()
        self._denials = [d for d in self._denials if now - d[3] < 10 * self.timings.tick]
        if self.ring.is_empty():
            if self._proposing and self._paxos is not None and now >= self._next_propose:
                if now - self._last_paxos_change >= self.timings.tick:
                    self._propose()
                else:
                    self._schedule_propose()
            if self._want_ring and self._ops:
                self._broadcast(want_ring=True)
        self._check_takeovers(ask=True)
        if self._handover is not None and not self._handover.done.is_set():
            self._ask_confirmation(self._handover.heir)
        self._retry_deferred()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_routes(self) -> None:
        self._check_takeovers(ask=False)
        self._wake()

    # =============================================================================================
    # The caller-facing API

    async def allocate(
        self,
        ident: str,
        subnet: IPv4Network | None = None,
        *,
        is_container: bool = False,
        timeout: float | None = 30.0,
    ) -> IPv4Interface:
        """An address for `ident` in `subnet` (default: the default subnet); the same one again if
        `ident` already holds one there. Raises IpamError (bad subnet, no space, timed out)."""
        self.check_ident(ident)
        subnet = self._check_subnet(subnet or self.default_subnet)
        op = _Op("allocate", trio.current_time())
        with self._waiting(op), trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                result = self._try_allocate(ident, subnet, is_container, op)
                if result is not None:
                    return result
                await self._wait()
        raise IpamError(f"{op.reason} (gave up after {timeout:g}s)", "unavailable")

    async def claim(
        self,
        ident: str,
        address: IPv4Interface,
        *,
        is_container: bool = False,
        no_error_on_unknown: bool = False,
        timeout: float | None = 30.0,
    ) -> None:
        """Record that `ident` uses `address` (static address, or found at restart). Inside the
        range it must be free here or donated by its owner; outside, only this host checks."""
        self.check_ident(ident)
        if not isinstance(address, IPv4Interface):
            raise IpamError(f"invalid address {address!r}: expected an IPv4 address with a prefix length")
        op = _Op("claim", trio.current_time())
        with self._waiting(op), trio.move_on_after(math.inf if timeout is None else timeout):
            while not self._try_claim(ident, address, is_container, no_error_on_unknown, op):
                await self._wait()
            return
        raise IpamError(f"{op.reason} (gave up after {timeout:g}s)", "unavailable")

    async def free(self, ident: str, address: IPv4Address | None = None) -> list[IPv4Interface]:
        """Release `address` held by `ident`, or all its addresses; returns what was released
        (empty if `ident` held nothing that matches)."""
        await trio.lowlevel.checkpoint()
        self.check_ident(ident)
        if ident == ANONYMOUS and address is not None:
            ident = str(address)
        holding = self._owned.get(ident)
        if holding is None:
            return []
        victims = [c for c in holding.addresses if address is None or c.ip == address]
        if not victims:
            return []
        for cidr in victims:
            holding.addresses.remove(cidr)
            if cidr.ip in self.range and not self.ring.is_empty():
                key = int(cidr.ip)
                self.ring.release(key)
                for (s, e), cursor in self._scan_from.items():
                    if s <= key < e and key < cursor:
                        self._scan_from[(s, e)] = key
        if not holding.addresses:
            del self._owned[ident]
        self._deferred = [d for d in self._deferred if not (d[0] == ident and d[1] in victims)]
        self._save(remove=[(ident, c) for c in victims])
        self._wake()
        return victims

    def lookup(self, ident: str, subnet: IPv4Network | None = None) -> list[IPv4Interface]:
        """The addresses `ident` holds (inside `subnet` if given)."""
        holding = self._owned.get(ident)
        if holding is None:
            return []
        return [c for c in holding.addresses if subnet is None or c.ip in subnet]

    def owned(self) -> dict[str, list[IPv4Interface]]:
        """Every ident and the addresses it holds on this peer."""
        return {ident: list(h.addresses) for ident, h in sorted(self._owned.items())}

    def owned_by_containers(self) -> dict[str, list[IPv4Interface]]:
        """The idents allocated as containers (attach, `check-alive`) and their addresses: all that
        a prune against Docker's containers may free (Weave Net's PruneOwned; CNI's are not)."""
        return {ident: list(h.addresses) for ident, h in sorted(self._owned.items()) if h.is_container}

    async def prime(self, timeout: float | None = None) -> None:
        """Wait until the ring exists (starting consensus if needed): `GET /ring`."""
        op = _Op("prime", trio.current_time())
        with self._waiting(op), trio.move_on_after(math.inf if timeout is None else timeout):
            while self.ring.is_empty():
                self._check_not_leaving()
                self._establish_ring()
                op.reason = self._not_ready_reason()
                await self._wait()
            return
        raise IpamError(f"{op.reason} (gave up after {timeout:g}s)", "unavailable")

    async def rmpeer(self, peer: str) -> str:
        """Take over the ranges of dead peer `peer` (name or unique nickname): "N IPs taken over from X".

        Refused while the peer is reachable. The ranges are not allocated from until every
        reachable IPAM peer has confirmed it holds our takeover; if another peer took them over
        concurrently, the ring's total order picks one owner and the other backs off untouched.
        """
        self._check_not_leaving()
        target = self._resolve_peer(peer)
        label = self._peer_label(target)
        if target == self._us:
            raise IpamError("cannot rmpeer ourselves: run 'weavenet reset' on this peer instead")
        if self.ring.is_empty():
            raise IpamError("IPAM has no ring yet: there is nothing to take over", "unavailable")
        if self._reachable(target):
            raise IpamError(
                f"peer {label} is reachable, so it is not dead: run 'weavenet reset' on it instead", "conflict"
            )
        theirs = {e.token for e in self.ring.entries() if e.peer == target}
        if not theirs:
            return f"0 IPs taken over from {label}"
        try:
            moved = self.ring.transfer(target, self._us)
        except RingError as exc:
            raise IpamError(f"cannot take over {label}: {exc}") from None
        self._scan_from.clear()
        tokens = {e.token: e.version for e in self.ring.entries() if e.token in theirs}
        takeover = _Takeover(target, tokens)
        self._takeovers.append(takeover)
        self._save()
        self._broadcast()
        total = sum(e - s for s, e in moved)
        log.info("rmpeer %s: took over %d IPs in %d ranges; confirming with reachable peers", label, total, len(moved))
        self._check_takeovers(ask=True)
        with trio.move_on_after(self.timings.confirm_timeout):
            await takeover.done.wait()
        kept = self._takeover_size(takeover)
        if takeover.lost_to and not kept:
            winners = ", ".join(self._peer_label(w) for w in sorted(takeover.lost_to))
            return f"0 IPs taken over from {label} (peer {winners} took them over at the same time)"
        if not takeover.done.is_set():
            waiting = len(self._confirmers() - takeover.acked)
            return f"{kept} IPs taken over from {label} (not used until {waiting} reachable peer(s) confirm)"
        return f"{kept} IPs taken over from {label}"

    async def leave(self) -> None:
        """Reset: stop allocating, hand all our ranges to a reachable heir and return once the heir
        has confirmed it holds them. Raises IpamError if nobody reachable can take them, or the
        heir did not confirm in time (the ranges then reach it only through gossip)."""
        self._leaving = True
        self._wake()  # pending callers see `_leaving` and give up
        await trio.lowlevel.checkpoint()
        if self.ring.is_empty() or not self.ring.owned_ranges():
            return
        heir = self._choose_heir()
        others = [p for p in self.ring.peers() if p != self._us]
        if heir is None:
            if not others:
                return  # the only peer in the ring: nobody to hand to, nobody stranded
            raise IpamError(
                "no reachable peer to hand our address ranges to: they stay stranded until someone runs "
                f"'weavenet rmpeer {PeerName(self._us)}'",
                "unavailable",
            )
        ours = {e.token for e in self.ring.entries() if e.peer == self._us}
        self.ring.clear_allocations()
        try:
            moved = self.ring.transfer(self._us, heir)
        except RingError as exc:
            raise IpamError(f"cannot hand our ranges to {self._peer_label(heir)}: {exc}") from None
        self._owned.clear()
        self._deferred.clear()
        tokens = {e.token: e.version for e in self.ring.entries() if e.token in ours}
        self._handover = _Handover(heir, tokens)
        self._save(clear_owned=True)
        self._broadcast()
        total = sum(e - s for s, e in moved)
        log.info("reset: handed %d IPs to %s; waiting for it to confirm", total, self._peer_label(heir))
        self._ask_confirmation(heir)
        with trio.move_on_after(self.timings.confirm_timeout):
            await self._handover.done.wait()
            log.info("reset: %s confirmed it holds our former ranges", self._peer_label(heir))
            return
        raise IpamError(
            f"handed {total} IPs to peer {self._peer_label(heir)} but it did not confirm within "
            f"{self.timings.confirm_timeout:g}s",
            "unavailable",
        )

    # =============================================================================================
    # Waiting

    @property
    def pending_allocates(self) -> int:
        return sum(1 for op in self._ops.values() if op.kind == "allocate")

    @property
    def pending_claims(self) -> int:
        """Callers waiting on a claim, plus claims retried in the background (found at start,
        or made with noErrorOnUnknown)."""
        return sum(1 for op in self._ops.values() if op.kind == "claim") + len(self._deferred)

    def _waiting(self, op: _Op) -> _OpRegistration:
        return _OpRegistration(self._ops, op)

    async def _wait(self) -> None:
        event = self._changed
        with trio.move_on_after(self.timings.tick):
            await event.wait()

    def _check_not_leaving(self) -> None:
        if self._leaving:
            raise IpamError("cancelled: IPAM on this peer is being reset", "cancelled")

    # =============================================================================================
    # Validation

    @staticmethod
    def check_ident(ident: str) -> None:
        if (
            not isinstance(ident, str)
            or not 0 < len(ident) <= MAX_IDENT
            or not ident.isascii()
            or not ident.isprintable()
            or any(c.isspace() or c in "/?#%" for c in ident)
        ):
            raise IpamError(
                f"invalid id {ident!r}: use 1-{MAX_IDENT} printable ASCII characters without spaces or / ? # %"
            )

    def _check_subnet(self, subnet: IPv4Network) -> IPv4Network:
        if not isinstance(subnet, IPv4Network):
            raise IpamError(f"invalid subnet {subnet!r}: expected an IPv4 CIDR such as 10.32.0.0/12")
        if subnet.prefixlen > MAX_SUBNET_PREFIX:
            raise IpamError(f"subnet {subnet} is too small to allocate in: use /{MAX_SUBNET_PREFIX} or larger")
        if not subnet.overlaps(self.range):
            raise IpamError(f"subnet {subnet} is outside the allocation range {self.range}")
        return subnet

    def _host_range(self, subnet: IPv4Network) -> tuple[int, int]:
        """The subnet's addresses minus its network and broadcast address, clipped to the range."""
        start = int(subnet.network_address) + 1
        end = int(subnet.broadcast_address)
        return max(start, self._start), min(end, self._end)

    # =============================================================================================
    # Allocate and claim (one attempt each; the callers loop)

    def _hold(self, ident: str, cidr: IPv4Interface, is_container: bool) -> None:
        holding = self._owned.setdefault(ident, _Holding(is_container))
        holding.is_container = holding.is_container or is_container
        if cidr not in holding.addresses:
            holding.addresses.append(cidr)

    def _record(self, ident: str, cidr: IPv4Interface, is_container: bool) -> None:
        if ident == ANONYMOUS:
            ident = str(cidr.ip)
        self._hold(ident, cidr, is_container)
        self._save(add=[(ident, cidr, is_container)])

    def _holder_of(self, address: IPv4Address) -> str | None:
        for ident, holding in self._owned.items():
            if any(c.ip == address for c in holding.addresses):
                return ident
        return None

    def _allowed(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) minus the ranges of takeovers not yet confirmed."""
        if start >= end:
            return []
        return _subtract([(start, end)], self._quarantine())

    def _quarantine(self) -> list[tuple[int, int]]:
        """The ranges of our unconfirmed takeovers (split where they wrap past the range's end)."""
        if not self._takeovers:
            return []
        sizes = {e.token: e.size for e in self.ring.entries()}
        pieces = []
        for takeover in self._takeovers:
            for token in takeover.tokens:
                end = token + sizes.get(token, 0)
                if end <= self._end:
                    pieces.append((token, end))
                else:
                    pieces += [(token, self._end), (self._start, self._start + end - self._end)]
        return sorted(pieces)

    def _try_allocate(self, ident: str, subnet: IPv4Network, is_container: bool, op: _Op) -> IPv4Interface | None:
        self._check_not_leaving()
        held = self.lookup(ident, subnet) if ident != ANONYMOUS else []
        if held:
            return held[0]
        if self.ring.is_empty():
            self._establish_ring()
            op.reason = self._not_ready_reason()
            return None
        start, end = self._host_range(subnet)
        pieces = self._allowed(start, end)
        # In a subnet wider than a /24, addresses ending in .0 or .255 are valid but trip up some
        # software (Weave Net handed them out): give them only when nothing else is free here.
        address = self._allocate_avoiding_edges(pieces) if subnet.prefixlen < 24 else None
        for s, e in pieces:
            if address is not None:
                break
            address = self.ring.allocate(s, e)
        if address is not None:
            cidr = IPv4Interface((address, subnet.prefixlen))
            self._record(ident, cidr, is_container)
            return cidr
        op.reason = self._request_space(start, end, subnet, op)
        return None

    def _allocate_avoiding_edges(self, pieces: list[tuple[int, int]]) -> int | None:
        """The lowest free address in `pieces` whose last octet is neither 0 nor 255, allocated.

        Free edge addresses stay free, so a scan would meet them again and again: `_scan_from`
        remembers, per piece, below which point there is nothing but allocated or edge addresses
        (lowered when an address is freed, forgotten when the ring changes)."""
        for start, end in pieces:
            cursor = max(start, self._scan_from.get((start, end), start))
            while cursor < end:
                found = self._lowest_free(cursor, end)
                if found is None:
                    break
                if found & 0xFF not in (0, 255):
                    if len(self._scan_from) > 64:
                        self._scan_from.clear()
                    self._scan_from[(start, end)] = found
                    return self.ring.allocate(found, found + 1)
                cursor = found + 1
        return None

    def _lowest_free(self, start: int, end: int) -> int | None:
        """The lowest free address we own in [start, end), found without allocating it."""
        if self.ring.free_count(start, end) == 0:
            return None
        while end - start > 1:
            middle = (start + end) // 2
            if self.ring.free_count(start, middle) > 0:
                end = middle
            else:
                start = middle
        return start

    def _subnet_range(self, subnet: IPv4Network) -> tuple[int, int]:
        """The whole subnet clipped to the range: what donation requests ask for (Weave Net's
        choice), so donors can give aligned blocks; allocation still skips network/broadcast."""
        start = int(subnet.network_address)
        return max(start, self._start), min(start + subnet.num_addresses, self._end)

    def _request_space(self, start: int, end: int, subnet: IPv4Network, op: _Op) -> str:
        """Ask the best reachable donor for space in [start, end); the reason we are waiting."""
        if start >= end:
            raise IpamError(f"no free addresses in {subnet}", "unavailable")
        donors = [d for d in self.ring.choose_donors(start, end) if not self._denied(start, end, d, op.started)]
        if not donors:
            if self.ring.free_count(start, end) > 0:
                return f"waiting for peers to confirm the takeover of free addresses in {subnet}"
            raise IpamError(f"no free addresses in {subnet}", "unavailable")
        reachable = [d for d in donors if self._reachable(d)]
        if not reachable:
            names = ", ".join(self._peer_label(d) for d in donors[:5])
            return (
                f"all free addresses in {subnet} are owned by unreachable peers ({names}): "
                "use 'weavenet rmpeer' if they are dead"
            )
        now = trio.current_time()
        donor = reachable[0]
        asked = op.asked.get(donor)
        if asked is None or now - asked >= self.timings.tick:
            op.asked[donor] = now
            self._unicast(donor, wire.SpaceRequest(*self._subnet_range(subnet)))
        return f"waiting for peer {self._peer_label(donor)} to donate space in {subnet}"

    def _denied(self, start: int, end: int, peer: int, since: float) -> bool:
        """Whether `peer` denied a request overlapping [start, end) since `since`."""
        return any(p == peer and s < end and start < e and when >= since for s, e, p, when in self._denials)

    def _try_claim(
        self, ident: str, cidr: IPv4Interface, is_container: bool, no_error_on_unknown: bool, op: _Op
    ) -> bool:
        """True when the claim is done (recorded, or deferred); raises IpamError when refused."""
        self._check_not_leaving()
        address = cidr.ip
        holder = self._holder_of(address)
        if address not in self.range:
            if holder is None or holder == ident or ident == ANONYMOUS:
                if holder is None:
                    self._record(ident, cidr, is_container)
                return True
            raise IpamError(f"address {address} is already in use by {holder}", "conflict")
        if self.ring.is_empty():
            self._establish_ring()
            if no_error_on_unknown:
                self._defer(ident, cidr, is_container)
                return True
            op.reason = self._not_ready_reason()
            return False
        key = int(address)
        if holder is not None and holder != ident and ident != ANONYMOUS:
            if holder == str(address):
                raise IpamError(f"address {address} is already in use", "conflict")
            raise IpamError(f"address {address} is already owned by {holder}", "conflict")
        owner = self.ring.owner(key)
        if owner == self._us:
            if not self.ring.is_allocated(key):  # a new claim, or one recorded before the ring had it
                if not self._allowed(key, key + 1):
                    op.reason = f"waiting for peers to confirm the takeover that includes {address}"
                    return False
                self.ring.claim_address(key)
                if holder is not None:
                    self._save()
            if holder is None:
                self._record(ident, cidr, is_container)
            return True
        assert owner is not None
        label = self._peer_label(owner)
        if self._denied(key, key + 1, owner, op.started):
            raise IpamError(f"address {address} is owned by other peer {label}, which has it in use", "conflict")
        op.tries += 1
        if not self._reachable(owner):
            if no_error_on_unknown:
                self._defer(ident, cidr, is_container)
                return True
            if op.tries > self.timings.claim_tries:
                raise IpamError(f"address {address} is owned by peer {label}, which is unreachable", "unavailable")
            op.reason = f"address {address} is owned by peer {label}, which is unreachable"
            return False
        now = trio.current_time()
        asked = op.asked.get(owner)
        if asked is None or now - asked >= self.timings.tick:
            op.asked[owner] = now
            self._unicast(owner, wire.SpaceRequest(key, key + 1))
        op.reason = f"waiting for peer {label} to hand over {address}"
        return False

    def _defer(self, ident: str, cidr: IPv4Interface, is_container: bool) -> None:
        """noErrorOnUnknown: the caller uses the address now; recorded (and persisted) at once,
        claimed in the ring when it can be."""
        if ident == ANONYMOUS:
            ident = str(cidr.ip)
        if self._holder_of(cidr.ip) is None:
            self._record(ident, cidr, is_container)
        if (ident, cidr, is_container) not in self._deferred:
            self._deferred.append((ident, cidr, is_container))

    def _retry_deferred(self) -> None:
        """Claims nobody waits for (pre-claims, persisted addresses, noErrorOnUnknown): retry; log outcomes."""
        if not self._deferred or self.ring.is_empty() or self._leaving:
            return
        pending, self._deferred = self._deferred, []
        for ident, cidr, is_container in pending:
            op = _Op("claim", 0.0)
            try:
                done = self._try_claim(ident, cidr, is_container, False, op)
            except IpamError as exc:
                log.warning("could not reclaim %s for %s: %s", cidr, ident, exc)
                continue
            if not done:
                self._deferred.append((ident, cidr, is_container))

    # =============================================================================================
    # Seeding: seed list, consensus, observers

    def _establish_ring(self) -> None:
        if not self.ring.is_empty():
            return
        if self.init.mode == "observer" or self._paxos is None:
            if not self._want_ring:
                self._want_ring = True
                self._broadcast(want_ring=True)
            return
        if not self._proposing:
            self._proposing = True
            log.info("IPAM: starting consensus (quorum %d)", self.quorum)
            self._propose()

    def _schedule_propose(self) -> None:
        self._next_propose = trio.current_time() + self.timings.tick * (1 + random.random())

    def _propose(self) -> None:
        assert self._paxos is not None
        self._paxos.propose()
        self._last_paxos_change = trio.current_time()
        self._schedule_propose()
        self._after_paxos(True)

    def _after_paxos(self, ours_changed: bool) -> None:
        assert self._paxos is not None
        if ours_changed:
            self._db.save(Change(meta={"paxos": self._paxos.to_json()}))
            self._broadcast()
        value = self._paxos.consensus()
        if value is not None and self.ring.is_empty():
            self._seed_ring(value, "consensus")

    def _not_ready_reason(self) -> str:
        if self.init.mode == "observer" or self._paxos is None:
            return "IPAM not ready: waiting for a peer to share the ring (this peer is an observer)"
        return f"IPAM not ready: waiting for consensus, {self._paxos.known()} of {self.quorum} peers seen"

    def _seed_ring(self, peers: tuple[int, ...], how: str) -> None:
        self.ring.claim_for_peers(peers)
        self._seeds = tuple(sorted(set(peers)))
        self._paxos = None
        self._proposing = False
        names = ", ".join(self._peer_label(p) for p in self._seeds)
        log.info("IPAM ring for %s initialised by %s: %s", self.range, how, names)
        self._save(meta={"paxos": None})
        self._broadcast()
        self._after_ring_change()

    # =============================================================================================
    # Gossip: the Gossiper protocol

    def gossip(self) -> GossipData | None:
        return IpamGossipData(self)

    def on_gossip(self, payload: bytes) -> GossipData | None:
        try:
            state = wire.decode_state(payload)
        except wire.WireError as exc:
            self._reject(0, f"invalid IPAM gossip: {exc}")
            return None
        return IpamGossipData(self) if self._receive(state, explicit=False) else None

    def on_gossip_broadcast(self, src: PeerName, payload: bytes) -> GossipData | None:
        try:
            state = wire.decode_state(payload)
        except wire.WireError as exc:
            self._reject(int(src), f"invalid IPAM broadcast: {exc}")
            return None
        if state.sender != int(src):
            self._reject(int(src), "IPAM broadcast names another sender")
            return None
        self._receive(state, explicit=True)
        return OpaqueGossipData([payload])  # relay along src's tree whatever it did here

    def on_gossip_unicast(self, src: PeerName, payload: bytes) -> None:
        try:
            message = wire.decode_unicast(payload)
        except wire.WireError as exc:
            self._reject(int(src), f"invalid IPAM message: {exc}")
            return
        sender = int(src)
        match message:
            case wire.SpaceRequest(start, end):
                self._donate(sender, start, end)
            case wire.SpaceDenied(start, end):
                self._denials.append((start, end, sender, trio.current_time()))
                self._wake()
            case wire.RingUpdate(state, want_reply):
                if state.sender != sender:
                    self._reject(sender, "IPAM ring update names another sender")
                    return
                self._receive(state, explicit=True)
                if want_reply and not self.ring.is_empty():
                    self._unicast(sender, wire.RingUpdate(self._state()))

    def _state(self, *, want_ring: bool = False) -> wire.State:
        paxos = dict(self._paxos.nodes) if self._paxos is not None and self.ring.is_empty() else None
        nicknames = {p: n for p, n in self._nicknames.items() if p != self._us}
        nicknames[self._us] = self._router.nickname
        return wire.State(
            sender=self._us,
            start=self._start,
            end=self._end,
            ring=None if self.ring.is_empty() else self.ring,
            paxos=paxos,
            seeds=self._seeds,
            nicknames=nicknames,
            want_ring=want_ring,
        )

    def _broadcast(self, *, want_ring: bool = False) -> None:
        self._channel.gossip_broadcast(IpamGossipData(self, want_ring=want_ring))

    def _unicast(self, peer: int, message: wire.Unicast) -> bool:
        try:
            self._channel.gossip_unicast(PeerName(peer), wire.encode_unicast(message))
        except UnknownRouteError:
            return False
        return True

    def _reject(self, peer: int, message: str) -> None:
        """A message we refuse: counted, logged once per (peer, message), never acted on."""
        self._rejected += 1
        key = (peer, message)
        if key not in self._logged and len(self._logged) < MAX_LOGGED_REJECTIONS:
            self._logged.add(key)
            source = f" from {self._peer_label(peer)}" if peer else ""
            log.warning("rejected%s: %s", source, message)

    def _mismatch(self, peer: int, message: str) -> None:
        self._mismatches[peer] = message
        self._reject(peer, message)

    def _receive(self, state: wire.State, *, explicit: bool) -> bool:
        """Apply a peer's state; True if ours changed (neighbour gossip relays it onwards)."""
        sender = state.sender
        if sender == self._us:
            return False
        if (state.start, state.end) != (self._start, self._end):
            ours, theirs = self.range, _fmt_range(state.start, state.end)
            self._mismatch(sender, f"Incompatible IP allocation ranges (received: {theirs}, ours: {ours})")
            return False
        self._ipam_peers.add(sender)
        self._learn_nicknames(state.nicknames)
        changed = False
        if state.ring is not None:
            changed = self._merge_ring(state.ring, state.seeds, sender)
        elif state.paxos is not None and self.ring.is_empty() and self._paxos is not None:
            any_changed, ours_changed = self._paxos_update(state.paxos)
            changed = any_changed
            self._after_paxos(ours_changed)
        if explicit and not self.ring.is_empty() and state.ring is None:
            # An observer asking, or an elector still voting: our ring ends its wait.
            if state.want_ring or state.paxos is not None:
                self._unicast(sender, wire.RingUpdate(self._state()))
        elif explicit and state.want_ring and self.ring.is_empty() and self._paxos is not None:
            self._establish_ring()
        return changed

    def _paxos_update(self, nodes: dict[int, Any]) -> tuple[bool, bool]:
        assert self._paxos is not None
        before = dict(self._paxos.nodes)
        ours_changed = self._paxos.update(nodes)
        any_changed = self._paxos.nodes != before
        if any_changed:
            self._last_paxos_change = trio.current_time()
        return any_changed, ours_changed

    def _learn_nicknames(self, nicknames: dict[int, str]) -> None:
        for peer, nickname in nicknames.items():
            if peer != self._us and (peer in self._nicknames or len(self._nicknames) < wire.MAX_NODES):
                self._nicknames[peer] = nickname

    def _merge_ring(self, incoming: Ring, seeds: tuple[int, ...], sender: int) -> bool:
        was_empty = self.ring.is_empty()
        try:
            changed = self.ring.merge(incoming)
        except RingMismatchError:
            ours = ", ".join(str(PeerName(s)) for s in self._seeds) or "?"
            theirs = ", ".join(str(PeerName(s)) for s in seeds) or "?"
            self._mismatch(
                sender,
                f"IP allocation was seeded by different peers (received: [{theirs}], ours: [{ours}]): "
                "refusing the ring; run 'weavenet reset' on one side to join the other",
            )
            return False
        self._mismatches.pop(sender, None)
        self._note_confirmations(sender, incoming)
        if not changed:
            return False
        self.ring.report_free()
        if was_empty:
            if seeds and Ring.cluster_id_for_seed(seeds) == self.ring.cluster_id:
                self._seeds = tuple(sorted(set(seeds)))
            self._paxos = None
            self._proposing = False
            log.info("IPAM ring for %s received from %s", self.range, self._peer_label(sender))
            self._save(meta={"paxos": None})
        else:
            self._save()
        self._after_ring_change()
        return True

    def _after_ring_change(self) -> None:
        self._want_ring = False
        self._scan_from.clear()
        for start, end in self.ring.disputed_ranges():
            if (start, end) not in self._disputed_logged and len(self._disputed_logged) < MAX_LOGGED_REJECTIONS:
                self._disputed_logged.add((start, end))
                log.error(
                    "addresses %s we hold now belong to peer %s (it was removed with rmpeer while alive?): "
                    "they are not handed out again; release them",
                    _fmt_range(start, end),
                    self._peer_label(self.ring.owner(start) or 0),
                )
        self._check_takeovers(ask=False)
        self._retry_deferred()
        self._wake()

    def _donate(self, requester: int, start: int, end: int) -> None:
        if self.ring.is_empty() or self._leaving:
            return
        block = None
        for s, e in self._allowed(start, end):
            try:
                block = self.ring.donate(s, e, requester)
            except RingError as exc:
                self._reject(requester, f"unusable space request: {exc}")
                break
            if block is not None:
                break
        if block is not None:
            log.info("donated %s to %s", _fmt_range(*block), self._peer_label(requester))
            self._save()
            self._broadcast()
            self._wake()
        elif not self._quarantined_free(start, end):
            self._unicast(requester, wire.SpaceDenied(start, end))
        # else: free space here awaits a takeover's confirmation; the requester asks again soon.
        self._unicast(requester, wire.RingUpdate(self._state()))

    def _quarantined_free(self, start: int, end: int) -> bool:
        """Whether we have free addresses in [start, end) that only a pending takeover holds back."""
        for s, e in self._quarantine():
            s, e = max(s, start), min(e, end)
            if s < e and self.ring.free_count(s, e) > 0:
                return True
        return False

    # =============================================================================================
    # Peers: reachability, names, rmpeer and reset confirmations

    def _reachable(self, peer: int) -> bool:
        return peer in self._router.routes.unicast_all

    def _confirmers(self) -> set[int]:
        """Reachable peers that run IPAM on our range (they own space in the ring, or sent us
        valid IPAM state): whose confirmation a takeover needs."""
        candidates = (self._ipam_peers | set(self.ring.peers())) - {self._us}
        return {p for p in candidates if self._reachable(p)}

    def nickname_of(self, peer: int) -> str:
        record = self._router.topology.get(PeerName(peer)) if peer else None
        if record is not None and record.nickname:
            return record.nickname
        if peer == self._us:
            return self._router.nickname
        return self._nicknames.get(peer, "")

    def _peer_label(self, peer: int) -> str:
        if not peer:
            return "?"
        nickname = self.nickname_of(peer)
        return f"{PeerName(peer)}({nickname})" if nickname else str(PeerName(peer))

    def _resolve_peer(self, text: str) -> int:
        try:
            return int(PeerName.parse(text))
        except ValueError:
            pass
        candidates = set(self.ring.peers()) | set(self._nicknames) | {int(p) for p in self._router.known_peers()}
        matches = sorted(p for p in candidates if self.nickname_of(p) == text)
        if not matches:
            raise IpamError(f"no peer with the name or nickname {text!r}")
        if len(matches) > 1:
            names = ", ".join(str(PeerName(p)) for p in matches)
            raise IpamError(f"nickname {text!r} is ambiguous ({names}): give the peer name instead")
        return matches[0]

    def _choose_heir(self) -> int | None:
        sizes = self.ring.size_by_owner()
        candidates = self._confirmers()
        if not candidates:
            return None
        # The reachable peer owning the most space (it is surely alive and running IPAM), then by name.
        return min(candidates, key=lambda p: (-sizes.get(p, 0), p))

    def _ask_confirmation(self, peer: int) -> None:
        self._unicast(peer, wire.RingUpdate(self._state(), want_reply=True))

    @staticmethod
    def _holds(ring: Ring, tokens: dict[int, int], owner: int) -> bool:
        """Whether `ring` has, at every token, our entry for `owner` or one that beats it."""
        entries = {e.token: (e.version, e.peer) for e in ring.entries()}
        return all(entries.get(t, (-1, 0)) >= (v, owner) for t, v in tokens.items())

    def _note_confirmations(self, sender: int, incoming: Ring) -> None:
        confirmed = False
        for takeover in self._takeovers:
            if sender not in takeover.acked and self._holds(incoming, takeover.tokens, self._us):
                takeover.acked.add(sender)
                confirmed = True
        if confirmed:
            self._check_takeovers(ask=False)
        handover = self._handover
        if handover is not None and sender == handover.heir and self._holds(incoming, handover.tokens, handover.heir):
            handover.done.set()

    def _check_takeovers(self, *, ask: bool) -> None:
        if not self._takeovers:
            return
        owners = {e.token: e.peer for e in self.ring.entries()}
        confirmers = self._confirmers()
        remaining = []
        for takeover in self._takeovers:
            for token in list(takeover.tokens):
                owner = owners.get(token)
                if owner != self._us:
                    del takeover.tokens[token]
                    if owner is not None:
                        takeover.lost_to.add(owner)
            waiting = confirmers - takeover.acked - {takeover.peer}
            if takeover.tokens and waiting:
                remaining.append(takeover)
                if ask:
                    for peer in waiting:
                        self._ask_confirmation(peer)
            else:
                takeover.done.set()
                label = self._peer_label(takeover.peer)
                if takeover.tokens:
                    log.info("takeover of %s confirmed: its former ranges are ours to allocate from", label)
                else:
                    log.info("takeover of %s: another peer took the ranges over; we hold none of them", label)
        if len(remaining) != len(self._takeovers):
            self._takeovers = remaining
            self._scan_from.clear()
            self._save()
            self._wake()

    def _takeover_size(self, takeover: _Takeover) -> int:
        """How many addresses of the takeover we still own."""
        return sum(e.size for e in self.ring.entries() if e.token in takeover.tokens and e.peer == self._us)

    # =============================================================================================
    # Persistence

    def _save(
        self,
        *,
        add: list[tuple[str, IPv4Interface, bool]] | None = None,
        remove: list[tuple[str, IPv4Interface]] | None = None,
        clear_owned: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Ring, address rows and bookkeeping in one transaction."""
        in_ring = set(self.ring.peers())
        values: dict[str, Any] = {
            "seeds": list(self._seeds),
            "takeovers": [t.to_json() for t in self._takeovers],
            "nicknames": {str(p): n for p, n in self._nicknames.items() if p in in_ring},
        }
        values.update(meta or {})
        self._db.save(
            Change(
                ring=None if self.ring.is_empty() else self.ring.to_bytes(),
                clear_ring=self.ring.is_empty(),
                add=add or [],
                remove=remove or [],
                clear_owned=clear_owned,
                meta=values,
            )
        )

    # =============================================================================================
    # Status

    def status(self) -> dict[str, Any]:
        """The IPAM block of `/status` (JSON)."""
        return {"Status": self._status_line(), "Range": str(self.range), "DefaultSubnet": str(self.default_subnet)}

    def _status_line(self) -> str:
        if self.ring.is_empty():
            if self._paxos is not None and self._proposing:
                return f"awaiting consensus (quorum: {self.quorum}, known: {self._paxos.known()})"
            if self._want_ring and self._ops:
                return "priming"
            return "idle"
        if self.pending_allocates:
            sizes = self.ring.free_by_owner()
            if not any(free for peer, free in sizes.items() if peer == self._us or self._reachable(peer)):
                return "all IP ranges owned by unreachable peers - use 'rmpeer' if they are dead"
            return "waiting for IP(s) to become available"
        return "ready"

    def report(self) -> dict[str, Any]:
        """The /report "IPAM" section: Weave Net's fields, plus what our fixes add."""
        sizes = self.ring.size_by_owner()
        free = self.ring.free_by_owner()
        known = {int(p) for p in self._router.known_peers()}
        entries = [
            {
                "Token": str(IPv4Address(e.token)),
                "Size": e.size,
                "Peer": str(PeerName(e.peer)),
                "Nickname": self.nickname_of(e.peer),
                "IsKnownPeer": e.peer in known,
                "Version": e.version,
                "Free": e.free,
            }
            for e in self.ring.entries()
        ]
        owners = [
            {
                "Peer": str(PeerName(p)),
                "Nickname": self.nickname_of(p),
                "Size": size,
                "Free": free.get(p, 0),
                "Reachable": p == self._us or self._reachable(p),
                "Self": p == self._us,
            }
            for p, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
        ]
        return {
            "Status": self._status_line(),
            "Paxos": None
            if self._paxos is None or not self.ring.is_empty()
            else {"Quorum": self.quorum, "Known": self._paxos.known(), "Proposing": self._proposing},
            "Range": str(self.range),
            "RangeNumIPs": self.range.num_addresses,
            "ActiveIPs": self.ring.allocated_count(),
            "DefaultSubnet": str(self.default_subnet),
            "Init": str(self.init),
            "Seeds": [str(PeerName(s)) for s in self._seeds],
            "Entries": entries,
            "Owners": owners,
            "PendingClaims": self.pending_claims,
            "PendingAllocates": self.pending_allocates,
            "Waiting": sorted({op.reason for op in self._ops.values()}),
            "Refused": {str(PeerName(p)): m for p, m in sorted(self._mismatches.items())},
            "Disputed": [_fmt_range(s, e) for s, e in self.ring.disputed_ranges()],
            "Takeovers": [
                {"Peer": self._peer_label(t.peer), "Confirmed": len(t.acked), "Tokens": len(t.tokens)}
                for t in self._takeovers
            ],
            "RejectedMessages": self._rejected,
        }

    def status_text(self) -> str:
        """`weavenet status ipam`: one line per owner (IPs, % of the range, reachable or not)."""
        return status_views.format_ipam_peers(self.report())

    def metrics(self) -> list[tuple[str, str, dict[str, str], float]]:
        return status_views.ipam_metrics(self.report())


class _OpRegistration:
    """Context manager: a waiting caller is visible in status and metrics while it waits."""

    def __init__(self, ops: dict[int, _Op], op: _Op) -> None:
        self._ops = ops
        self._op = op

    def __enter__(self) -> _Op:
        self._ops[id(self._op)] = self._op
        return self._op

    def __exit__(self, *exc: object) -> None:
        self._ops.pop(id(self._op), None)
