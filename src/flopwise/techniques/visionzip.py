"""VisionZip: dominant tokens by attention, the rest merged into a few contextual tokens ("VisionZip: Longer
is Better but Not Necessary in Vision Language Models", Yang et al., CVPR 2025, arXiv:2412.04467;
https://github.com/dvlab-research/VisionZip).

Of the ``k`` slots, ``round(k * contextual)`` (the paper's 10 of 64 by default, at least one) hold
*contextual* tokens and the others the *dominant* tokens, those the class token attends to most (towers
without one, as Qwen2-VL's: those the other tokens attend to most, :mod:`.visiondrop`'s score). The
remaining tokens are split as the paper does: evenly spaced targets among them, each other token assigned
to its most similar target (cosine), and a contextual token = its target + the mean of the tokens assigned
to it — a new embedding, not a copy. It takes the target's place in the image (its position).

The paper reads the tower's own attention weights and keys at the layer LLaVA selects; fused attention
kernels do not return them, so flopwise computes the class token's attention and the similarity on that
layer's output features (no extra tower pass), the same stand-in :mod:`.cls_attention` uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.cls_attention import CLSAttention
from flopwise.techniques.visiondrop import VisionDrop
from flopwise.techniques.visual_drop import Selection, VisualMethod, register, top_k


@register("visionzip")
@dataclass(frozen=True)
class VisionZip(VisualMethod):
    contextual: float = 10 / 64  # share of the slots that hold merged tokens (paper: 54 + 10 of 64)

    def select(self, tokens, k, query=None, text=None) -> Selection:
        n = tokens.shape[0]
        merged = min(max(1, round(k * self.contextual)), k - 1, n - k) if k > 1 else 0
        scorer = VisionDrop() if query is None else CLSAttention()
        dominant = top_k(scorer.score(tokens, query), k - merged)
        if merged == 0:
            return Selection(dominant)
        rest = torch.ones(n, dtype=torch.bool, device=tokens.device)
        rest[dominant] = False
        rest = rest.nonzero().flatten()
        step = max(1, len(rest) // merged)
        pick = torch.zeros(len(rest), dtype=torch.bool, device=tokens.device)
        pick[torch.arange(0, len(rest), step, device=tokens.device)[:merged]] = True
        targets, others = rest[pick], rest[~pick]
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        assign = (unit[others] @ unit[targets].T).argmax(1)  # ties to the lower target
        kept, order = torch.sort(torch.cat([dominant, targets]))
        weights = torch.zeros(k, n, device=tokens.device)
        weights[torch.arange(k, device=tokens.device), kept] = 1.0  # every slot holds its own token...
        counts = torch.bincount(assign, minlength=merged).clamp(min=1).float()
        slot = order.argsort()[len(dominant) + assign]  # ...and a target's slot the mean of its group
        weights[slot, others] = 1.0 / counts[assign]
        return Selection(kept, weights)
