"""Knorm ("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", Devoto et al., 2024,
arXiv:2406.11430): keys with a small L2 norm draw the most attention, so keep the lowest-norm keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register


@register("knorm")
@dataclass(frozen=True)
class Knorm(KVPolicy):
    def score(self, ctx: KVContext) -> torch.Tensor:
        return -ctx.keys[ctx.rel].float().norm(dim=-1).T  # [Hkv, N]
