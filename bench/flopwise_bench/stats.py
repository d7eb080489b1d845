"""Confidence intervals for benchmark figures: percentile bootstrap over items (problems, prompts)."""

from __future__ import annotations

import random
from collections.abc import Sequence

RESAMPLES = 2000


def bootstrap_ci(values: Sequence[float], level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of the mean of ``values`` (one value per item)."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(RESAMPLES))
    lo = means[int((1 - level) / 2 * RESAMPLES)]
    hi = means[min(RESAMPLES - 1, int((1 + level) / 2 * RESAMPLES))]
    return lo, hi


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The interval of mean(a - b) over the same items (a paired bootstrap)."""
    return bootstrap_ci([x - y for x, y in zip(a, b, strict=True)], level)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance a random positive outscores a random negative (ties half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    # Mann-Whitney U with mid-ranks for ties
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based mid-rank of the tie block
        rank_sum += mid * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))
