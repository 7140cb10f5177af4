"""Property tests of the IPAM ring: the Rust ring against the plain-Python model, step by step.

Hypothesis drives random histories over four replicas (allocate, claim, release, donate, grant,
rmpeer-style transfer, report_free, gossip directly or through the encoding) through BOTH
`weavenet._fastdp.Ring` and `tests.ipam_model.ring_model.ModelRing`, and requires identical
results and state after every step. On top of that, the invariants of spec/ipam.md §5: exact
cover, the join laws, convergence in any gossip order, cross-replica safety, free accounting, and
an encoding that round-trips and refuses garbage.

Budget: the main differential test runs 2000 examples (profile "ring"); the whole file stays well
under two minutes on a busy two-core machine. WEAVENET_RING_PROFILE=ring-quick runs a tenth;
WEAVENET_RING_PROFILE=ring-soak runs 25x more (a long soak, before touching the merge rules).
"""

from __future__ import annotations

import itertools
import os
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.ipam_model.ring_model import (
    ModelDecodeError,
    ModelError,
    ModelMismatchError,
    ModelRing,
    cluster_id_for_seed,
)
from weavenet._fastdp import Ring, RingDecodeError, RingError, RingMismatchError

settings.register_profile(
    "ring",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ring-quick", parent=settings.get_profile("ring"), max_examples=200)
settings.register_profile("ring-soak", parent=settings.get_profile("ring"), max_examples=50_000)
PROFILE = settings.get_profile(os.environ.get("WEAVENET_RING_PROFILE", "ring"))
# Secondary properties: half the main budget each.
SECONDARY = settings(PROFILE, max_examples=max(50, PROFILE.max_examples // 2))

PEERS = [0x0A_0000_0001, 0x0A_0000_0002, 0x0B_0000_0003, 0x0C_0000_0004]
OTHER_SEED = [0x0D_0000_0005]


# ----- histories ---------------------------------------------------------------------------------


@dataclass
class Setup:
    start: int
    size: int
    seed_mask: int  # which peers the common seed names
    seeded_mask: int  # which replicas start seeded (the rest start empty, like observers)
    rogue: int | None  # a replica seeded by a different cluster, if any


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    size = draw(st.one_of(st.integers(1, 8), st.integers(9, 300), st.sampled_from([64, 256, 512])))
    placement = draw(st.sampled_from(["any", "aligned", "top"]))
    if placement == "top":
        start = (1 << 32) - size
    elif placement == "aligned" and size & (size - 1) == 0:
        start = draw(st.integers(0, (1 << 32) // size - 1)) * size
    else:
        start = draw(st.integers(0, (1 << 32) - size))
    rogue = draw(st.one_of(st.none(), st.integers(0, 3))) if draw(st.integers(0, 9)) == 0 else None
    seeded = draw(st.one_of(st.just(15), st.integers(0, 15)))
    return Setup(start, size, draw(st.integers(1, 15)), seeded, rogue)


replica = st.integers(0, 3)
big = st.integers(0, 1 << 40)


def op_strategy(transfers: bool) -> st.SearchStrategy[tuple]:
    options = [
        st.tuples(st.just("allocate"), replica, big, big),
        st.tuples(st.just("claim"), replica, big, st.booleans()),
        st.tuples(st.just("release"), replica, big),
        st.tuples(st.just("donate"), replica, replica, big, big),
        st.tuples(st.just("grant"), replica, replica, big, big, big, st.booleans()),
        st.tuples(st.just("gossip"), replica, replica, st.booleans()),
        st.tuples(st.just("gossip"), replica, replica, st.booleans()),
        st.tuples(st.just("report_free"), replica),
    ]
    if transfers:
        options.append(st.tuples(st.just("transfer"), replica, replica))
        options.append(st.tuples(st.just("clear"), replica))
    return st.one_of(options)


@dataclass
class Replica:
    rust: Ring
    model: ModelRing


def make_replicas(setup: Setup) -> list[Replica]:
    end = setup.start + setup.size
    seed = [p for i, p in enumerate(PEERS) if setup.seed_mask & (1 << i)]
    out = []
    for i, peer in enumerate(PEERS):
        rep = Replica(Ring(setup.start, end, peer), ModelRing(setup.start, end, peer))
        if i == setup.rogue:
            rep.rust.claim_for_peers(OTHER_SEED)
            rep.model.claim_for_peers(OTHER_SEED)
        elif setup.seeded_mask & (1 << i):
            rep.rust.claim_for_peers(seed)
            rep.model.claim_for_peers(seed)
        out.append(rep)
    return out


def kind(exc: BaseException) -> str:
    if isinstance(exc, RingMismatchError | ModelMismatchError):
        return "mismatch"
    if isinstance(exc, RingDecodeError | ModelDecodeError):
        return "decode"
    if isinstance(exc, RingError | ModelError):
        return "refused"
    raise exc


def both(rep: Replica, method: str, *args: object) -> object:
    """Call `method` on the Rust ring and on the model; both must return the same or fail alike."""
    results = []
    for ring in (rep.rust, rep.model):
        try:
            results.append(("ok", getattr(ring, method)(*args)))
        except ValueError as exc:
            results.append(("error", kind(exc)))
    assert results[0] == results[1], f"{method}{args}: rust {results[0]}, model {results[1]}"
    event(f"{method}: {results[0][0]}")
    status, value = results[0]
    return value if status == "ok" else None


def state_of_model(model: ModelRing) -> tuple:
    return (
        model.entry_tuples(),
        model.cluster_id,
        model.allocated_ranges(),
        model.owned_ranges(),
        model.disputed_ranges(),
    )


def state_of_rust(ring: Ring) -> tuple:
    return (
        [e.as_tuple() for e in ring.entries()],
        ring.cluster_id,
        ring.allocated_ranges(),
        ring.owned_ranges(),
        ring.disputed_ranges(),
    )


def assert_same(rep: Replica, full: bool = False) -> None:
    assert state_of_rust(rep.rust) == state_of_model(rep.model)
    rep.rust.check_invariants()
    rep.model.check()
    if full:
        assert rep.rust.to_bytes() == rep.model.to_bytes()
        assert rep.rust.free_by_owner() == rep.model.free_by_owner()
        assert rep.rust.size_by_owner() == rep.model.size_by_owner()
        donors = rep.rust.choose_donors()
        assert donors == rep.model.choose_donors()
        # Donor choice (§5.19): never us, never a peer with nothing free, each peer once.
        free = rep.rust.free_by_owner()
        assert sorted(donors) == sorted(p for p, n in free.items() if n > 0 and p != rep.rust.peer)
        assert rep.rust.free_count() == rep.model.free_count()


def apply(reps: list[Replica], op: tuple) -> list[int]:
    """Apply one operation to both implementations; returns the replicas it may have changed."""
    name, r = op[0], op[1]
    rep = reps[r]
    model = rep.model
    start, size = model.start, model.end - model.start

    def span(lo: int, length: int) -> tuple[int, int]:
        s = start + lo % size
        return s, min(s + 1 + length % size, model.end)

    if name == "allocate":
        s, e = span(op[2], op[3])
        lowest = next((a for a in range(s, e) if model.is_ours(a) and not model.is_allocated(a)), None)
        assert both(rep, "allocate", s, e) == lowest, "allocate takes the lowest free address we own"
    elif name == "claim":
        owned = model.owned_ranges()
        if owned and op[3]:
            lo, hi = owned[op[2] % len(owned)]
            addr = lo + op[2] % (hi - lo)
        else:
            addr = start + op[2] % size
        both(rep, "claim_address", addr)
    elif name == "release":
        runs = model.allocated_ranges()
        if runs:
            lo, hi = runs[op[2] % len(runs)]
            addr = lo + op[2] % (hi - lo)
        else:
            addr = start + op[2] % size
        both(rep, "release", addr)
    elif name == "donate":
        s, e = span(op[3], op[4])
        free_before = model.free_count(s, e) if model.entries else 0
        block = both(rep, "donate", s, e, PEERS[op[2]])
        if block is not None:
            bs, be = block
            n = be - bs
            assert s <= bs < be <= e
            assert n & (n - 1) == 0 and bs % n == 0, "donation not CIDR-aligned"
            assert n <= max(1, -(-free_before // 2)), "donated more than half the free space"
            assert not any(model.is_allocated(a) for a in range(bs, be))
    elif name == "grant":
        owned = model.owned_ranges()
        if op[6]:  # usually pick from what is free, so most grants are allowed
            free = [a for lo, hi in owned for a in range(lo, hi) if not model.is_allocated(a)]
            owned = [(a, b) for a, b in _runs(free)]
        if owned:
            lo, hi = owned[op[3] % len(owned)]
            s = lo + op[4] % (hi - lo)
            e = min(s + 1 + op[5] % (hi - s), hi)
            both(rep, "grant", s, e, PEERS[op[2]])
        else:
            both(rep, "grant", start, start + 1, PEERS[op[2]])
    elif name == "transfer":
        both(rep, "transfer", PEERS[op[2]], PEERS[r])
    elif name == "clear":
        both(rep, "clear_allocations")
    elif name == "report_free":
        both(rep, "report_free")
        for i, e in enumerate(model.entries):
            if e.owner == model.peer:
                assert e.free == model.exact_free(i), "after report_free, our hints equal a recount"
    elif name == "gossip":
        sender, via_bytes = reps[op[2]], op[3]
        if via_bytes:
            rust_other: Ring = Ring.from_bytes(sender.rust.to_bytes())
            model_other = ModelRing.from_bytes(sender.model.to_bytes())
        else:
            rust_other, model_other = sender.rust, sender.model
        results = []
        for ring, other in ((rep.rust, rust_other), (rep.model, model_other)):
            try:
                results.append(("ok", ring.merge(other)))
            except ValueError as exc:
                results.append(("error", kind(exc)))
        assert results[0] == results[1], f"merge: rust {results[0]}, model {results[1]}"
        event(f"merge: {results[0]}")
    return [r]


def _runs(addresses: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for a in addresses:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + 1)
        else:
            runs.append((a, a + 1))
    return runs


def run(setup: Setup, ops: list[tuple]) -> list[Replica]:
    reps = make_replicas(setup)
    for rep in reps:
        assert_same(rep, full=True)
    for op in ops:
        versions_before = {e.token: e.version for e in reps[op[1]].rust.entries()}
        for r in apply(reps, op):
            assert_same(reps[r])
        # Monotonicity (§5.5): tokens never vanish and versions never go down.
        versions_after = {e.token: e.version for e in reps[op[1]].rust.entries()}
        assert all(versions_after.get(t, -1) >= v for t, v in versions_before.items())
    for rep in reps:
        assert_same(rep, full=True)
    return reps


def assert_exact_cover(ring: Ring) -> None:
    """Every address has exactly one owner; the owners' ranges tile the ring range."""
    if ring.is_empty():
        assert ring.owner(ring.start) is None
        return
    tiles = sorted((s, e, p) for p in ring.peers() for s, e in ring.owned_ranges(p))
    cursor = ring.start
    for s, e, p in tiles:
        assert s == cursor, f"gap or overlap at {s:#x}"
        assert ring.owner(s) == p and ring.owner(e - 1) == p
        cursor = e
    assert cursor == ring.end
    assert sum(ring.size_by_owner().values()) == ring.end - ring.start


def replica_state(ring: Ring) -> tuple:
    return ([e.as_tuple() for e in ring.entries()], ring.cluster_id)


def merged(a: Ring, b: Ring) -> Ring:
    out = a.copy()
    out.merge(b)
    return out


# ----- the main differential test ----------------------------------------------------------------


@PROFILE
@given(setup=setups(), ops=st.lists(op_strategy(transfers=True), min_size=5, max_size=40))
def test_rust_ring_matches_the_model_step_by_step(setup, ops):
    reps = run(setup, ops)
    for rep in reps:
        assert_exact_cover(rep.rust)


# ----- the algebra and safety properties ---------------------------------------------------------


@SECONDARY
@given(
    setup=setups(),
    ops=st.lists(op_strategy(transfers=True), min_size=3, max_size=25),
    pick=st.tuples(replica, replica, replica),
)
def test_merge_is_commutative_associative_idempotent(setup, ops, pick):
    assume(setup.rogue is None)
    reps = run(setup, ops)
    a, b, c = (reps[i].rust for i in pick)
    assert replica_state(merged(a, b)) == replica_state(merged(b, a))
    assert replica_state(merged(merged(a, b), c)) == replica_state(merged(a, merged(b, c)))
    ab = merged(a, b)
    assert ab.merge(b) is False and ab.merge(a) is False
    assert ab.merge(ab.copy()) is False and ab.merge(ab) is False
    assert_exact_cover(ab)
    ab.check_invariants()
    # The model agrees on the joined state.
    mab = reps[pick[0]].model.copy()
    mab.merge(reps[pick[1]].model)
    assert replica_state(ab) == (mab.entry_tuples(), mab.cluster_id)


@SECONDARY
@given(
    setup=setups(),
    ops=st.lists(op_strategy(transfers=True), min_size=3, max_size=25),
    order=st.permutations(list(itertools.permutations(range(4), 2))),
)
def test_replicas_converge_whatever_the_gossip_order(setup, ops, order):
    """One delivery of every replica's state to every other, in any order, gives one ring."""
    assume(setup.rogue is None)
    reps = run(setup, ops)
    for src, dst in order:
        reps[dst].rust.merge(reps[src].rust.copy())
    states = {repr(replica_state(rep.rust)) for rep in reps}
    assert len(states) == 1
    for rep in reps:
        assert_exact_cover(rep.rust)


@SECONDARY
@given(setup=setups(), ops=st.lists(op_strategy(transfers=False), min_size=5, max_size=30))
def test_without_rmpeer_no_address_is_owned_or_held_by_two_peers(setup, ops):
    """Cross-replica safety (§5.7, §5.8): what p owns in p's own replica never overlaps what q
    owns in q's own replica, and no address is allocated on two peers."""
    assume(setup.rogue is None)
    reps = run(setup, ops)
    for p, q in itertools.permutations(range(4), 2):
        for s1, e1 in reps[p].rust.owned_ranges():
            for s2, e2 in reps[q].rust.owned_ranges():
                assert e1 <= s2 or e2 <= s1, f"peers {p} and {q} both own {max(s1, s2):#x}"
    held: dict[int, int] = {}
    for i, rep in enumerate(reps):
        assert rep.rust.disputed_ranges() == []
        for s, e in rep.rust.allocated_ranges():
            for addr in range(s, e):
                assert held.setdefault(addr, i) == i, f"{addr:#x} allocated on two peers"


@SECONDARY
@given(setup=setups(), ops=st.lists(op_strategy(transfers=True), max_size=15), data=st.data())
def test_encoding_round_trips_and_mutations_are_refused_or_valid(setup, ops, data):
    reps = run(setup, ops)
    rep = reps[data.draw(replica)]
    encoded = rep.rust.to_bytes()
    back = Ring.from_bytes(encoded)
    assert back.to_bytes() == encoded
    assert replica_state(back) == replica_state(rep.rust)
    # Mutate the body and re-seal the checksum, so the structural checks are what decides.
    body = bytearray(encoded[:-4])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(body)))
        value = data.draw(st.integers(0, 255))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip" and at < len(body):
            body[at] ^= value | 1
        elif action == "delete" and at < len(body):
            del body[at]
        else:
            body.insert(at, value)
    mutated = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "big")
    check_decoders_agree(mutated)


def check_decoders_agree(data: bytes) -> None:
    try:
        ring = Ring.from_bytes(data)
    except RingDecodeError:
        event("decode: refused")
        with pytest.raises(ModelDecodeError):
            ModelRing.from_bytes(data)
        return
    event("decode: accepted")
    model = ModelRing.from_bytes(data)
    ring.check_invariants()
    assert ring.to_bytes() == data == model.to_bytes()
    assert [e.as_tuple() for e in ring.entries()] == model.entry_tuples()
    assert_exact_cover(ring)


@SECONDARY
@given(data=st.binary(max_size=200), reseal=st.booleans(), keep_header=st.booleans())
def test_decode_refuses_garbage_without_crashing(data, reseal, keep_header):
    if keep_header:
        data = b"WR\x01" + data
    if reseal:
        data += zlib.crc32(data).to_bytes(4, "big")
    check_decoders_agree(data)


@SECONDARY
@given(
    start=st.integers(0, (1 << 32) - 1),
    size=st.integers(1, 1 << 20),
    peers=st.lists(st.sampled_from(PEERS), min_size=1, max_size=8),
)
def test_seeding_is_deterministic_and_divides_the_whole_range(start, size, peers):
    start = min(start, (1 << 32) - size)
    a = Ring(start, start + size, PEERS[0])
    a.claim_for_peers(peers)
    b = Ring(start, start + size, PEERS[1])
    b.claim_for_peers(sorted(set(peers), reverse=True))
    assert replica_state(a) == replica_state(b)
    assert a.merge(b) is False
    unique = sorted(set(peers))
    assert a.cluster_id == cluster_id_for_seed(unique) == Ring.cluster_id_for_seed(peers)
    assert sum(a.free_by_owner().values()) == size
    if size >= len(unique):
        assert a.peers() == unique
    assert_exact_cover(a)
