"""Fitting a head PRM: step labels from the verifier, logistic regression on hidden states, step AUROC.

A step's label is whether the answer is still right up to and including it (every equation so far holds),
the process-supervision label of Math-Shepherd; lines with no equation get no label.
"""

from __future__ import annotations

import torch

from flopwise.prm.arithmetic import check_line
from flopwise.prm.base import split_steps


def step_labels(answer: str) -> tuple[list[str], list[int | None]]:
    """(steps, label per step): 1 while every equation so far holds, 0 from the first wrong one; None if
    unjudged."""
    steps, labels, ok = split_steps(answer, final=True), [], True
    for step in steps:
        verdict = check_line(step)
        ok = ok and verdict != 0.0
        labels.append(None if verdict is None else int(ok))
    return steps, labels


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def fit_head(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (L-BFGS, class-balanced, L2) -> (weight [d], bias [1]) on raw features."""
    x, y = x.float(), y.float()
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = (len(y) - y.sum()) / y.sum().clamp(min=1)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight)
            + l2 * w.square().sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    # fold the standardisation into the head so it reads raw hidden states
    weight = (w / std).detach()
    bias = (b - (w * mean / std).sum()).detach()
    return weight, bias


@torch.no_grad()
def self_examples(
    model, traces: list[tuple[list[int], list[int]]], newlines: frozenset[int], decode, batch: int = 8
) -> list[tuple[torch.Tensor, list[int | None]]]:
    """For a ``self:`` head: per (prompt ids, output ids) trace, the generator's last hidden state at each
    step value's position (:func:`flopwise.prm.self_head.step_rows`, the position that emitted the token)
    and its label (right so far through that token, :func:`flopwise.prm.self_head.prefix_label`). The
    traces are read in right-padded batches of ``batch``: one forward pass each, no generation."""
    from flopwise.prm.self_head import prefix_label, step_rows

    out = []
    for b in range(0, len(traces), batch):
        chunk = traces[b : b + batch]
        seqs = [p + o for p, o in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        for i, (prompt, output) in enumerate(chunk):
            rows = step_rows(output, newlines, final=True)
            labels = [prefix_label(decode(output[: j + 1]), final=j == len(output) - 1) for j in rows]
            out.append((hidden[i, [len(prompt) + j - 1 for j in rows]].float(), labels))
    return out
