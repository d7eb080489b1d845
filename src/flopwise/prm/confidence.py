"""``confidence`` and ``confidence:tail``: scores from the generator's own next-token distributions.

DeepConf ("Deep Think with Confidence", arXiv:2508.15260): a token's confidence is the negative mean
log-probability of the top-k tokens at its position, C = -(1/k) sum_j log p_j; a trace's *group
confidence* is the mean of C over a sliding window of tokens, and its *lowest group confidence* (the
minimum over the windows so far) flags a trace that went astray, online. ``confidence`` scores a
candidate by its lowest group confidence, ``confidence:tail`` by the group confidence of its last window.

No extra model call: the engine computes the top-k log-probabilities where the logits already are
(vLLM's sampler, raw log-softmax) and the scheduler folds them in as tokens arrive. The cost charged per
scored token is that log-softmax over the vocabulary (:data:`OPS_PER_VOCAB_ENTRY` elementwise operations
per entry: max, subtract, exp, sum, log-subtract) plus the k-term mean.

Scores are mapped into [0, 1] so keep rules read alike for every scorer: C >= log k always (the top k of
a distribution carry at most all of its mass), so ``1 - log(k) / C`` is 0 for a flat top-k and tends to 1
for a peaked one, and keeps C's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flopwise.prm.base import NEUTRAL

NAMES = {"confidence": "lowest", "confidence:tail": "tail"}
OPS_PER_VOCAB_ENTRY = 5


def token_confidence(top_logprobs: Sequence[float]) -> float:
    """DeepConf's token confidence of one position from its top-k log-probabilities, mapped into [0, 1]."""
    k = len(top_logprobs)
    c = -sum(top_logprobs) / k
    if k < 2 or c <= 0:
        return 1.0  # one token (or all mass on the top ones): nothing to tell apart
    return min(1.0, max(0.0, 1.0 - math.log(k) / c))


def score(confidences: Sequence[float], window: int, mode: str) -> float:
    """A candidate's score from its tokens' confidences: the lowest (``mode`` "lowest") or the last
    ("tail") mean over ``window`` consecutive tokens; shorter answers use all their tokens."""
    n = len(confidences)
    if n == 0:
        return NEUTRAL
    w = min(window, n)
    if mode == "tail":
        return sum(confidences[n - w :]) / w
    total = sum(confidences[:w])
    lowest = total
    for t in range(w, n):
        total += confidences[t] - confidences[t - w]
        lowest = min(lowest, total)
    return lowest / w


def flops_per_token(vocab: int, top_k: int) -> int:
    """FLOPs charged per scored token: the log-softmax over ``vocab`` plus the top-k mean."""
    return OPS_PER_VOCAB_ENTRY * vocab + top_k


def from_logits(logits, top_k: int) -> float:
    """Token confidence from one position's raw logits (torch): what the engine's logprobs give."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return token_confidence(torch.topk(logprobs, top_k).values.tolist())
