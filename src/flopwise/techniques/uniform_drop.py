"""Content-blind baselines: ``uniform`` keeps evenly spaced tokens, ``random`` a seeded random subset.

``random`` draws from a generator seeded by the image's token count, so the engine and the reference
(and two runs of the same request) keep the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.visual_drop import VisualScorer, register


@register("uniform")
@dataclass(frozen=True)
class UniformDrop(VisualScorer):
    def score(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        # Score = -(distance to the nearest point of an even grid over [0, n)) would depend on k; instead rank
        # by a bit-reversal order, whose first k entries are spread evenly for every k.
        n = tokens.shape[0]
        return -_spread_order(n).to(tokens.device).float()


@register("random")
@dataclass(frozen=True)
class RandomDrop(VisualScorer):
    seed: int = 0

    def score(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + tokens.shape[0])
        return torch.rand(tokens.shape[0], generator=g).to(tokens.device)


def _spread_order(n: int) -> torch.Tensor:
    """rank[i] for i in range(n): tokens taken in van der Corput order (0, n/2, n/4, 3n/4, ...)."""
    bits = max(1, (n - 1).bit_length())
    keys = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)]
    order = [i for i in sorted(range(1 << bits), key=keys.__getitem__) if i < n]
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(n)
    return rank
