"""TOVA ("Transformers are Multi-State RNNs", Oren et al., 2024, arXiv:2401.06104): keep the tokens the
newest query attends to most, by its attention averaged over all heads (so every KV head keeps the same
tokens); the newest token itself is always kept. As kvpress's TOVAPress, applied once to the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register, window_attention


@register("tova")
@dataclass(frozen=True)
class TOVA(KVPolicy):
    query_window = 1

    def score(self, ctx: KVContext) -> torch.Tensor:
        attn = window_attention(ctx.keys, ctx.queries).mean(0)  # the last query, averaged over heads: [n]
        attn[-1] = attn.max()  # the newest token stays
        return attn[ctx.rel].expand(ctx.keys.shape[1], -1)

    def scoring_flops(self, prompt: int, q_heads: int, head_dim: int) -> int:
        return 2 * q_heads * head_dim * prompt  # one query's QK^T
