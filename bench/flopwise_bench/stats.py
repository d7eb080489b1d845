"""Confidence intervals for benchmark figures: percentile bootstrap over items (problems, prompts).

(AUROC: :func:`flopwise.prm.train.auroc`.)
"""

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
