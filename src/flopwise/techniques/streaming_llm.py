"""StreamingLLM ("Efficient Streaming Language Models with Attention Sinks", Xiao et al., 2023,
arXiv:2309.17453): keep the first ``sinks`` tokens, which soak up attention whatever they say, plus the
most recent window. Position alone decides; no scoring cost. Under a token budget (``kv_keep_tokens``)
generation evicts the oldest tail blocks behind the kept prompt (:func:`~flopwise.techniques.kv_drop.evicts`)
instead of re-scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register


@register("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    sinks: int = 4  # the paper's four attention-sink tokens
    rescores = False  # position alone decides: under a token budget it evicts the oldest tail blocks

    @property
    def min_tokens(self) -> int:
        return self.sinks + 1  # the sinks and at least the newest token

    def score(self, ctx: KVContext) -> torch.Tensor:
        pos = torch.arange(ctx.start, ctx.end, dtype=torch.float32)
        score = torch.where(pos < self.sinks, float(ctx.prompt_len) + 1, pos)  # sinks first, then recency
        return score.expand(ctx.keys.shape[1], -1)
