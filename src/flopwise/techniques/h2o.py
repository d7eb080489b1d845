"""H2O / accumulated attention ("H2O: Heavy-Hitter Oracle", Zhang et al., 2023, arXiv:2306.14048; the
prefill form is kvpress's ObservedAttentionPress): score each token by the attention every prompt query
pays it, averaged over its KV group's query heads and divided by the number of queries that could see
it (later tokens are seen by fewer). Needs every prompt query: the costliest policy to score. Re-scoring
while decoding (under a token budget) reads the last ``decode_window`` queries only: a token is then seen
by the window's queries that follow it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register, window_attention


@register("h2o")
@dataclass(frozen=True)
class H2O(KVPolicy):
    query_window = None  # every query
    decode_window = 64  # the recent queries decode-time re-scoring reads (as SnapKV's window)

    def score(self, ctx: KVContext) -> torch.Tensor:
        n = ctx.keys.shape[0]
        received = window_attention(ctx.keys, ctx.queries)  # [Hkv, n]
        seen_by = torch.arange(n, 0, -1, dtype=torch.float32).clamp(max=ctx.queries.shape[0])
        return (received / seen_by)[:, ctx.rel]

    def scoring_flops(self, prompt: int, q_heads: int, head_dim: int) -> int:
        return 2 * q_heads * head_dim * prompt * (prompt + 1) // 2  # causal QK^T over the prompt
