"""IPAM ring hot paths, Rust against the plain-Python reference model in the same run.

Gated on ratios (benches/ratio.py), never on times: the Rust ring must be at least 20x faster.
Absolute figures are printed and recorded in the benchmark's extra_info (targets: a merge of two
10,000-entry rings under 1 ms; over 100k allocate/release operations per second through the
Python API).
"""

from __future__ import annotations

import pytest

from benches.ratio import assert_speedup, compare
from tests.ipam_model.ring_model import ModelRing
from weavenet._fastdp import Ring

pytestmark = pytest.mark.benchmark(group="ipam-ring")

UNIVERSE = (0x0A20_0000, 0x0A30_0000)  # 10.32.0.0/12
REQUIRED_SPEEDUP = 20.0


def both_seeded(peer: int, seed: list[int]) -> tuple[Ring, ModelRing]:
    rust, model = Ring(*UNIVERSE, peer), ModelRing(*UNIVERSE, peer)
    rust.claim_for_peers(seed)
    model.claim_for_peers(seed)
    return rust, model


def diverged_pair() -> tuple[tuple[Ring, ModelRing], tuple[Ring, ModelRing]]:
    """Two replicas of a 10,000-entry ring that each saw changes the other did not: transfers
    (version bumps) and grants (new tokens) on both sides, so a merge does real work."""
    seed = list(range(1, 10_001))
    a, b = both_seeded(seed[0], seed), both_seeded(seed[1], seed)
    for (rust, model), dead in ((a, seed[2:1000:7]), (b, seed[3:1000:5])):
        for peer in dead:
            rust.transfer(peer, rust.peer)
            model.transfer(peer, model.peer)
    for (rust, model), donor in ((a, a[0].peer), (b, b[0].peer)):
        for start, end in rust.owned_ranges()[:200]:
            if end - start >= 2:
                rust.grant(start, start + (end - start) // 2, 20_000 + donor)
                model.grant(start, start + (end - start) // 2, 20_000 + donor)
    assert len(a[0].entries()) > 10_000 and len(b[0].entries()) > 10_000
    return a, b


def test_merge_of_two_10k_entry_rings(benchmark):
    (rust_a, model_a), (rust_b, model_b) = diverged_pair()
    merged_rust, merged_model = rust_a.copy(), model_a.copy()
    assert merged_rust.merge(rust_b) is True and merged_model.merge(model_b) is True
    assert [e.as_tuple() for e in merged_rust.entries()] == merged_model.entry_tuples()

    def ours() -> None:
        rust_a.copy().merge(rust_b)

    def reference() -> None:
        model_a.copy().merge(model_b)

    result = assert_speedup(
        benchmark, ours, reference, at_least=REQUIRED_SPEEDUP, label="merge two 10k-entry rings (copy + merge)"
    )
    # Absolute figures for the report: the gossip paths around the merge.
    nothing_new = compare(lambda: merged_rust.merge(rust_b), lambda: merged_model.merge(model_b), label="no-op merge")
    data = rust_b.to_bytes()
    decode = compare(lambda: rust_a.copy().merge(Ring.from_bytes(data)), lambda: None, label="decode + merge")
    copy_only = compare(rust_a.copy, lambda: None, label="copy")
    benchmark.extra_info.update(
        {
            "entries": len(merged_rust.entries()),
            "merge_us": round((result.ours_s - copy_only.ours_s) * 1e6, 1),
            "copy_plus_merge_us": round(result.ours_s * 1e6, 1),
            "noop_merge_us": round(nothing_new.ours_s * 1e6, 1),
            "decode_plus_merge_us": round(decode.ours_s * 1e6, 1),
            "encoded_bytes": len(data),
        }
    )
    print(
        f"merge of {len(merged_rust.entries())}-entry rings: copy+merge {result.ours_s * 1e6:.0f} us "
        f"(copy alone {copy_only.ours_s * 1e6:.0f} us; target < 1000 us), no-op merge "
        f"{nothing_new.ours_s * 1e6:.1f} us (model {nothing_new.reference_s * 1e3:.1f} ms), decode+merge "
        f"{decode.ours_s * 1e6:.0f} us for {len(data)} bytes; speedup {result.speedup:.0f}x"
    )


def test_allocate_and_release_through_the_python_api(benchmark):
    """The allocator's hot path: take the lowest free address in the default subnet, give it back.
    Our peer owns a /18 (64 peers seeded) with 1,000 addresses already held."""
    seed = list(range(1, 65))
    rust, model = both_seeded(seed[0], seed)
    host_range = (UNIVERSE[0] + 1, UNIVERSE[1] - 1)
    for _ in range(1000):
        rust.allocate(*host_range)
        model.allocate(*host_range)
    for addr in range(UNIVERSE[0] + 100, UNIVERSE[0] + 1000, 3):  # some holes, as churn leaves
        rust.release(addr)
        model.release(addr)
    assert rust.allocated_ranges() == model.allocated_ranges()

    def ours() -> None:
        rust.release(rust.allocate(*host_range))

    def reference() -> None:
        model.release(model.allocate(*host_range))

    result = assert_speedup(
        benchmark, ours, reference, at_least=REQUIRED_SPEEDUP, label="allocate + release (1,000 held)"
    )
    ops_per_s = 2 / result.ours_s
    benchmark.extra_info["ops_per_s"] = round(ops_per_s)
    print(
        f"allocate+release: {result.ours_s * 1e9:.0f} ns per pair = {ops_per_s / 1e3:.0f}k ops/s "
        f"(target > 100k ops/s); model {result.reference_s * 1e6:.0f} us per pair; speedup {result.speedup:.0f}x"
    )
    # Same state as the model, except free_seq: each side ran its own number of rounds.
    assert [e.as_tuple()[:5] for e in rust.entries()] == [t[:5] for t in model.entry_tuples()]
