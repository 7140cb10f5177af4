"""Same-run speed comparisons: a benchmark gates on a ratio to a reference, never on a time.

Machines are noisy and CI machines differ, so absolute times are reported but never asserted.
`assert_speedup` times our implementation and a reference in one process, interleaving their
rounds so a burst of background load hits both, takes the best round of each, and asserts the
ratio. The ratio and both times land in pytest-benchmark's `extra_info` for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Comparison:
    ours_s: float  # best seconds per call, ours
    reference_s: float  # best seconds per call, the reference
    label: str

    @property
    def speedup(self) -> float:
        return self.reference_s / self.ours_s

    def describe(self) -> str:
        return (
            f"{self.label}: ours {self.ours_s * 1e6:.2f} us/call, "
            f"reference {self.reference_s * 1e6:.2f} us/call, speedup {self.speedup:.1f}x"
        )


def _calls_per_round(fn: Callable[[], Any], target_s: float) -> int:
    """How many calls make one round last about `target_s` (like timeit's autorange)."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= target_s or number >= 1 << 24:
            return number
        number *= 2


def _best_per_call(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    *,
    label: str,
    rounds: int = 7,
    round_s: float = 0.05,
) -> Comparison:
    """Time `ours` and `reference` in interleaved rounds; keep the best round of each."""
    n_ours = _calls_per_round(ours, round_s)
    n_ref = _calls_per_round(reference, round_s)
    best_ours = best_ref = float("inf")
    for _ in range(rounds):
        best_ref = min(best_ref, _best_per_call(reference, n_ref))
        best_ours = min(best_ours, _best_per_call(ours, n_ours))
    return Comparison(ours_s=best_ours, reference_s=best_ref, label=label)


def assert_speedup(
    benchmark: Any,
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    *,
    at_least: float,
    label: str,
) -> Comparison:
    """Benchmark `ours` with pytest-benchmark and require it to beat `reference` by `at_least`×."""
    result = compare(ours, reference, label=label)
    benchmark.extra_info.update(
        {"speedup": round(result.speedup, 2), "ours_s": result.ours_s, "reference_s": result.reference_s}
    )
    benchmark(ours)
    print(result.describe())
    assert result.speedup >= at_least, f"{result.describe()}; required at least {at_least}x"
    return result
