"""The ratio helper itself: it must tell a fast function from a slow one, and fail when asked too much."""

import pytest

from benches.ratio import assert_speedup, compare


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


def test_compare_ranks_cheaper_work_as_faster():
    result = compare(lambda: _work(100), lambda: _work(2000), label="100 vs 2000 squares")
    assert result.speedup > 3


def test_assert_speedup_fails_when_the_reference_is_faster(benchmark):
    with pytest.raises(AssertionError, match="required at least"):
        assert_speedup(benchmark, lambda: _work(2000), lambda: _work(100), at_least=1.0, label="inverted")
