"""CDPruner: the most diverse tokens *conditioned on the instruction* ("Beyond Attention or Similarity:
Maximizing Conditional Diversity for Token Pruning in MLLMs", Zhang et al., NeurIPS 2025, arXiv:2506.10967;
https://github.com/Theia-4869/CDPruner).

A determinantal point process over the image's tokens whose kernel is ``L = diag(r) S diag(r)``: ``S`` the
cosine similarity of the (projected) tokens, ``r`` each token's relevance to the request's instruction (mean
cosine similarity to the instruction's tokens, min-max scaled to (0, 1]). The ``k`` tokens are the DPP's
greedy MAP (the paper's fast incremental-Cholesky loop): a token is taken for being relevant and unlike
those already taken. With no instruction text, ``r`` is 1 everywhere: a plain diversity DPP.

The paper scores relevance with CLIP's text tower against CLIP image embeddings (and negates it, a choice
specific to that space). Served VLMs have no text tower, so flopwise compares the projected image tokens
with the instruction's embeddings in the language model's own input space, positive as the method reads.
LLaVA runs its projector on every token for this (charged); Qwen2-VL's M-RoPE positions are fixed before
its encoder runs, when no token is in the language model's space yet, so Qwen models refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from flopwise.techniques.visual_drop import Selection, VisualMethod, register


@register("cdpruner")
@dataclass(frozen=True)
class CDPruner(VisualMethod):
    uses_text: ClassVar[bool] = True

    def select(self, tokens, k, query=None, text=None) -> Selection:
        unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
        if text is None or len(text) == 0:
            rel = torch.ones(len(unit), device=unit.device)
        else:
            rel = (unit @ torch.nn.functional.normalize(text.float(), dim=-1).T).mean(-1)
            rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min() + 1e-6)
        kernel = rel[:, None] * (unit @ unit.T) * rel[None, :]
        return Selection(torch.sort(greedy_map(kernel, k)).values)


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The greedy MAP of a DPP with kernel ``kernel`` [N, N]: ``k`` indices, each maximising the gain in
    log-determinant (Chen et al. 2018's incremental Cholesky; argmax ties to the lower index)."""
    n = kernel.shape[0]
    rows = torch.zeros(k, n, device=kernel.device, dtype=kernel.dtype)
    gain = torch.diagonal(kernel).clone()  # d_i^2: the determinant gain of adding i
    chosen = []
    for i in range(k):
        j = int(gain.argmax())
        chosen.append(j)
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / gain[j].clamp(min=1e-12).sqrt()
        rows[i] = e
        gain = gain - e * e
        gain[j] = -float("inf")
    return torch.tensor(chosen, device=kernel.device)
