"""Random baseline: keep a uniformly random subset of the region (seeded per request and layer), the
floor any scoring policy has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register


@register("random")
@dataclass(frozen=True)
class RandomKV(KVPolicy):
    def score(self, ctx: KVContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seed * 1009 + ctx.layer)
        return torch.rand(ctx.keys.shape[1], ctx.end - ctx.start, generator=g)
