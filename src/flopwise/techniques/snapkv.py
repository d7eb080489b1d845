"""SnapKV ("SnapKV: LLM Knows What You are Looking for Before Generation", Li et al., 2024,
arXiv:2404.14469): the prompt's last ``window`` queries (the observation window) already attend to what
generation will need. Score each earlier token by the attention the window pays it, averaged over the
window and the query heads of its KV group, smoothed by 1-D average pooling (``kernel``) so that kept
tokens come with their neighbours; the window itself is always kept. Same as kvpress's SnapKVPress."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flopwise.techniques.kv_drop import KVContext, KVPolicy, register, window_attention


@register("snapkv")
@dataclass(frozen=True)
class SnapKV(KVPolicy):
    window: int = 64  # observation window (the paper's and kvpress's default)
    kernel: int = 5  # pooling kernel

    @property
    def query_window(self) -> int:
        return self.window

    @property
    def min_tokens(self) -> int:
        return self.window

    def score(self, ctx: KVContext) -> torch.Tensor:
        n, w = ctx.keys.shape[0], ctx.queries.shape[0]
        attn = (window_attention(ctx.keys, ctx.queries) / w)[:, : n - w]  # mean over the window: [Hkv, n - w]
        pooled = (
            F.avg_pool1d(
                attn.unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=True
            ).squeeze(1)
            if n - w > 0
            else attn
        )
        top = pooled.max() if pooled.numel() else torch.tensor(0.0)
        scores = torch.cat([pooled, top.expand(pooled.shape[0], w)], dim=1)  # the window scores highest
        return scores[:, ctx.rel]

    def scoring_flops(self, prompt: int, q_heads: int, head_dim: int) -> int:
        return 2 * q_heads * head_dim * min(self.window, prompt) * prompt  # QK^T of the window
