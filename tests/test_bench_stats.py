"""The benchmarks' statistics: bootstrap intervals against direct computations."""

import pytest

from flopwise_bench.stats import bootstrap_ci, paired_ci


def test_bootstrap_interval_holds_the_mean_and_shrinks_with_more_items():
    small = [1, 0] * 20
    large = [1, 0] * 200
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2  # about 1/sqrt(10) as wide
    assert bootstrap_ci([1] * 30) == (1.0, 1.0)
    # paired: identical items give a zero difference; a constant shift shows as that shift
    assert paired_ci(small, small) == (0.0, 0.0)
    assert paired_ci([1] * 40, small) == pytest.approx((0.5, 0.5), abs=0.2)
