"""Local text for calibration, distillation and perplexity: Python standard-library sources.

They ship with every Python, so these splits are the same on every machine and need no download.
Splits are by file, disjoint and deterministic: ``train`` for training tiny models and distilling,
``calib`` for calibration passes, ``eval`` for perplexity.
"""

from __future__ import annotations

import glob
import os
import sysconfig

SPLITS = {"train": (0, 140), "calib": (140, 154), "eval": (154, 168)}  # of the ~168 top-level modules


def _files() -> list[str]:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def text(split: str, max_chars: int | None = None) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    lo, hi = SPLITS[split]
    out, size = [], 0
    for path in _files()[lo:hi]:
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk = f.read()
        out.append(chunk)
        size += len(chunk)
        if max_chars is not None and size >= max_chars:
            break
    joined = "\n".join(out)
    return joined[:max_chars] if max_chars is not None else joined


def token_blocks(tokenizer, split: str, block: int, count: int, at_most: bool = False):
    """``count`` rows of ``block`` token ids from a split, as a LongTensor [count, block]; with ``at_most``,
    as many whole rows as the split holds when it holds fewer (a long distillation cycles through them)."""
    import torch

    ids = tokenizer(text(split, max_chars=block * count * 8), return_tensors=None)["input_ids"]
    need = block * count
    if len(ids) < need and at_most:
        count = len(ids) // block
        need = block * count
    if len(ids) < need or count == 0:
        raise ValueError(f"split {split!r} has {len(ids)} tokens, {need} needed")
    return torch.tensor(ids[:need], dtype=torch.long).view(count, block)


def perplexity(
    model, tokenizer, split: str = "eval", block: int = 256, count: int = 16, batch: int = 4
) -> float:
    """Token-level perplexity of ``model`` on ``count`` blocks of ``block`` tokens of a split."""
    import math

    import torch

    rows = token_blocks(tokenizer, split, block, count)
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, count, batch):
            x = rows[i : i + batch]
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            n += x[:, 1:].numel()
    return math.exp(total / n)
