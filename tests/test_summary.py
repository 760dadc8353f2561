"""The window summary's exact impact sums round as math.fsum does, whatever is taken out."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from exporter.summary import exact, rounded

FINITE = st.floats(min_value=-1e300, max_value=1e300)  # no sum of 50 can overflow


@given(st.lists(FINITE, max_size=40), st.lists(FINITE, max_size=10))
def test_an_exact_sum_with_some_taken_out_is_the_fsum_of_the_rest(
    kept: list[float], gone: list[float]
) -> None:
    total = sum(exact(x) for x in kept + gone)
    total -= sum(exact(x) for x in gone)
    assert rounded(total) == math.fsum(kept)


def test_the_extremes_are_exact() -> None:
    tiny = 5e-324  # the smallest subnormal
    assert exact(tiny) == 1
    assert rounded(exact(1e308) + exact(1e308) - exact(1e308)) == 1e308
    assert rounded(exact(0.1) + exact(0.2)) == math.fsum([0.1, 0.2]) == 0.30000000000000004
    assert rounded(-2 * exact(1.7e308)) == -math.inf  # past the largest float
