"""VisionDrop-style visual-only importance ("Rethinking Visual Token Reduction in LVLMs under
Cross-modal Misalignment", arXiv:2506.22283).

A token is important if the other visual tokens attend to it: the score is the attention each token
receives, summed over all visual queries, computed from the visual features alone (no text, so it
works before the language model runs and with any prompt). Features are mean-centred first: the
component every token shares (a plain background) carries no information and would otherwise make
the most common tokens attract the most attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.visual_drop import VisualScorer, register


@register("visiondrop")
@dataclass(frozen=True)
class VisionDrop(VisualScorer):
    temperature: float = 1.0  # softmax temperature on the scaled dot products

    def score(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        x = tokens - tokens.mean(0, keepdim=True)
        attn = torch.softmax(x @ x.T / (x.shape[-1] ** 0.5 * self.temperature), dim=-1)
        return attn.sum(0)  # attention received, over all queries
