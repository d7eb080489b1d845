"""H2O / accumulated attention ("H2O: Heavy-Hitter Oracle", Zhang et al., 2023, arXiv:2306.14048; the
prefill form is kvpress's ObservedAttentionPress): score each token by the attention the prompt's queries
pay it, averaged over its KV group's query heads and divided by the number of those queries that could see
it (later tokens are seen by fewer).

Restricted to the prompt's last ``window`` queries (256; ``None``: every query, as the paper and kvpress).
Every query costs a causal QK^T over the prompt and its softmax: with all of them, at 3k tokens on a 2-core
CPU, scoring doubled the prefill and h2o ran 0.63x of stock vLLM end to end, though it decoded 1.4x faster.
The last 256 take 39 ms a layer there instead of 287 (9 query heads of 64; end to end 0.98x, within that
machine's noise: bench/results/kv_decode.md), and a prefix-cache hit before the window can be read (the
window is recomputed). Re-scoring while decoding (under a token budget) reads
the last ``decode_window`` queries: a token is then seen by the window's queries that follow it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register, window_attention


@register("h2o")
@dataclass(frozen=True)
class H2O(KVPolicy):
    window: int | None = 256  # the prompt's last queries whose attention is accumulated (None: all)
    decode_window = 64  # the recent queries decode-time re-scoring reads (as SnapKV's window)

    @property
    def query_window(self) -> int | None:
        return self.window

    def score(self, ctx: KVContext) -> torch.Tensor:
        n = ctx.keys.shape[0]
        received = window_attention(ctx.keys, ctx.queries)  # [Hkv, n]
        seen_by = torch.arange(n, 0, -1, dtype=torch.float32).clamp(max=ctx.queries.shape[0])
        return (received / seen_by)[:, ctx.rel]

    def scoring_flops(self, prompt: int, q_heads: int, head_dim: int) -> int:
        w = prompt if self.window is None else min(self.window, prompt)
        # The last w queries' causal QK^T: query j of the window sees prompt - w + j + 1 keys.
        return 2 * q_heads * head_dim * (w * (prompt - w) + w * (w + 1) // 2)
