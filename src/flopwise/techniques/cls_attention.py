"""CLS-attention score, the FastV-style choice for encoders with a class token ("An Image is Worth 1/2
Tokens After Layer 2", arXiv:2403.06764, ranks image tokens by the attention they receive; CLIP's class
token summarises the image, so its attention over the patches is the usual text-free stand-in).

Score = softmax over the patches of ``<query, token> / sqrt(D)``, with the class token as the query
(the mean token for towers without one, e.g. Qwen2-VL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.visual_drop import VisualScorer, register


@register("cls_attention")
@dataclass(frozen=True)
class CLSAttention(VisualScorer):
    def score(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        q = tokens.mean(0) if query is None else query
        return torch.softmax(tokens @ q / tokens.shape[-1] ** 0.5, dim=0)
