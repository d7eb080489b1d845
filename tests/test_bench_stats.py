"""The benchmarks' statistics: bootstrap intervals and AUROC against direct computations."""

import itertools
import random

import pytest

from flopwise_bench.stats import auroc, bootstrap_ci, paired_ci


def test_auroc_is_the_pairwise_win_rate():
    rng = random.Random(3)
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounded: many ties
    labels = [rng.random() < 0.4 + 0.4 * s for s in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    assert auroc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None  # one class only: undefined


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
