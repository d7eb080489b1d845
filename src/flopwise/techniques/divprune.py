"""DivPrune: keep the most diverse tokens ("DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", Alvar et al., CVPR 2025, arXiv:2503.02175; https://github.com/vbdi/divprune).

Token selection as a max-min diversity problem, solved greedily as the paper does: the first token is the
one farthest (cosine distance) from its nearest neighbour; each next one is the token whose distance to
the nearest token already kept is largest. Training-free and text-free; no hyper-parameter. Duplicates
(plain background) cost one slot in all, so the budget goes to objects and edges. The paper prunes the
projector's output; flopwise selects on the features the projector reads (LLaVA) or the merged patch
embeddings (Qwen2-VL), so the projector and the language model run on the kept tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flopwise.techniques.visual_drop import Selection, VisualMethod, register


@register("divprune")
@dataclass(frozen=True)
class DivPrune(VisualMethod):
    def select(self, tokens, k, query=None, text=None) -> Selection:
        return Selection(torch.sort(max_min_order(tokens, k)).values)


def max_min_order(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` tokens of the greedy max-min order (argmax ties to the lower index)."""
    x = torch.nn.functional.normalize(tokens.float(), dim=-1)
    dist = 1.0 - x @ x.T
    n = dist.shape[0]
    own = torch.arange(n, device=dist.device)
    first = dist.clone()
    first[own, own] = float("inf")  # a token's nearest neighbour is another token
    chosen = [int(first.min(0).values.argmax())]
    nearest = dist[chosen[0]].clone()  # each token's distance to the nearest kept one
    nearest[chosen[0]] = -float("inf")
    for _ in range(k - 1):
        j = int(nearest.argmax())
        chosen.append(j)
        nearest = torch.minimum(nearest, dist[j])
        nearest[j] = -float("inf")  # never chosen twice, even where duplicates make the distance 0
    return torch.tensor(chosen, device=tokens.device)
