"""The "anyres" image layout of LLaVA-NeXT and LLaVA-OneVision, so visual dropping can prune each region.

An image becomes a base view (the whole image at the tower's resolution) plus a grid of crops of a larger
resized copy. The language model reads the base view's tokens, then the crops' tokens stitched into one
feature map, cropped back to the image's aspect ratio ("unpad"; OneVision then shrinks a large map to about
``anyres_max_N`` crops' worth), row by row with an ``image_newline`` embedding closing each row
(transformers' ``pack_image_features``, vLLM's ``_merge_image_patch_embeddings``). Dropping keeps the same
fraction of the base view and of the grid and every newline, so the kept tokens stay in reading order and
each row still ends where it did.
"""

from __future__ import annotations

import math

import torch

from flopwise.techniques import visual_drop as vd


def best_grid(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """Crops (rows, cols) of an image (height, width): the pinpoint resolution that keeps the most of the
    image and wastes the least (transformers' ``select_best_resolution``), in tiles of ``tile`` pixels."""
    h, w = image_size
    best, most, waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < waste):
            best, most, waste = (ph, pw), effective, wasted
    return best[0] // tile, best[1] // tile


def _unpadded(rows: int, cols: int, image_size: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a stitched feature map that hold the image, not its letterbox padding."""
    h, w = image_size
    if w / h > cols / rows:
        pad = (rows - int(round(h * (cols / w), 7))) // 2
        return slice(pad, rows - pad), slice(0, cols)
    pad = (cols - int(round(w * (rows / h), 7))) // 2
    return slice(0, rows), slice(pad, cols - pad)


def grid_order(image_size: tuple[int, int], grid: tuple[int, int], side: int) -> torch.Tensor:
    """The stitched grid's tokens in the order the language model reads them: an index into the crops'
    tokens flattened ([crops * side * side], crops in row-major grid order) or -1 for a row's newline.

    ``image_size`` (height, width) in pixels, ``grid`` (rows, cols) of crops, ``side`` tokens per crop side.
    """
    gr, gc = grid
    r = torch.arange(gr * side)[:, None]
    c = torch.arange(gc * side)[None, :]
    index = ((r // side) * gc + c // side) * side * side + (r % side) * side + c % side
    rows, cols = _unpadded(gr * side, gc * side, image_size)
    index = index[rows, cols]
    newline = torch.full((index.shape[0], 1), -1, dtype=index.dtype)
    return torch.cat([index, newline], dim=1).flatten()


def counts(
    image_size: tuple[int, int], grid: tuple[int, int], side: int, max_crops: int | None = None
) -> tuple[int, int]:
    """(grid tokens, rows) of the unpadded stitched grid: the image's LM tokens are base + grid + rows.

    ``max_crops`` (LLaVA-OneVision's ``anyres_max_N``): a grid of more than ~N crops' worth of tokens is
    shrunk (bilinear) to about that many, keeping its aspect ratio."""
    rows, cols = _unpadded(grid[0] * side, grid[1] * side, image_size)
    n_rows, n_cols = len(range(*rows.indices(grid[0] * side))), len(range(*cols.indices(grid[1] * side)))
    if max_crops is not None:
        ratio = math.sqrt(n_rows * n_cols / (max_crops * side * side))
        if ratio > 1.1:
            n_rows, n_cols = int(n_rows // ratio), int(n_cols // ratio)
    return n_rows * n_cols, n_rows


def kept_layout(order: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Which places of ``order`` a pruned image keeps: every newline, and the grid tokens whose rank in
    reading order is in ``kept``."""
    is_token = order >= 0
    keep = torch.zeros(int(is_token.sum()), dtype=torch.bool)
    keep[kept] = True
    mask = ~is_token
    mask[is_token] = keep
    return mask


def pack(base: torch.Tensor, grid: torch.Tensor, layout: torch.Tensor, order: torch.Tensor, newline):
    """The image's LM embeddings: the kept base tokens, then the kept grid tokens (``grid``, reading order)
    with ``newline`` where each row ends."""
    out = newline.to(grid.dtype).expand(int(layout.sum()), -1).clone()
    out[order[layout] >= 0] = grid
    return torch.cat([base, out])


def layout(
    image_size: tuple[int, int], pinpoints: list, tile: int, patch: int, aspect_ratio: str | None = None
) -> tuple[tuple[int, int], int, int]:
    """An image's crops (rows, cols), its grid's tokens and rows (:func:`counts`), from the model's
    ``image_grid_pinpoints``, tower ``image_size`` / ``patch_size`` and, for LLaVA-OneVision,
    ``vision_aspect_ratio`` ("anyres_max_9")."""
    grid = best_grid(image_size, pinpoints, tile)
    max_crops = int(aspect_ratio.removeprefix("anyres_max_")) if aspect_ratio else None
    return (grid, *counts(image_size, grid, tile // patch, max_crops))


def kept_tokens(tokens: int, rows: int, base: int, keep: float) -> int:
    """LM tokens an image keeps at ``keep``: that fraction of the base view's ``base`` tokens and of the
    grid's ``tokens`` (:func:`counts`), and every row's newline."""
    return vd.keep_count(base, keep) + vd.keep_count(tokens, keep) + rows


def prune_views(
    views: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], config, query, project, newline
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaVA-NeXT: one image's LM embeddings from its tower features, every view's ([1 + crops, side²,
    D], class token removed): each region scored with ``query`` (the base view's class token), the kept
    tokens alone through ``project``, ``newline`` after each row. Returns the embeddings and the kept
    indices (the base view's, then the grid's in reading order after them)."""
    side = math.isqrt(views.shape[1])
    if side * side != views.shape[1]:
        raise ValueError(f"a view of {views.shape[1]} features is not a square grid (a class token left in?)")
    order = grid_order(image_size, grid, side).to(views.device)
    base, tokens = views[0], views[1:].flatten(0, 1)[order[order >= 0]]
    sb, sg = vd.select(base, config, query), vd.select(tokens, config, query)
    mask = kept_layout(order.cpu(), sg.kept.cpu()).to(views.device)
    embeds = pack(project(sb.take(base)), project(sg.take(tokens)), mask, order, newline)
    return embeds, torch.cat([sb.kept.cpu(), sg.kept.cpu() + len(base)])


def prune_packed(
    packed: torch.Tensor, grid_tokens: int, rows: int, config, newline: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop tokens from an image's LM embeddings as the model packed them (the base view's, then ``rows``
    rows of the grid's ``grid_tokens``, each row closed by ``newline``), scoring each region on those
    embeddings (no class token there: query-free) — for a model that reshapes its grid after the projector
    (LLaVA-OneVision). Returns the kept embeddings and their places in ``packed``."""
    base, cols = len(packed) - grid_tokens - rows, grid_tokens // rows
    if rows * cols != grid_tokens or base < 1:
        raise ValueError(f"an image of {len(packed)} embeddings does not hold {rows} rows of {grid_tokens}")
    order = torch.arange(rows * (cols + 1), device=packed.device)
    order = torch.where(order % (cols + 1) == cols, -1, order)  # places in the grid part; -1: a newline
    head, grid = packed[:base], packed[base:]
    tokens = grid[order >= 0]
    sb, sg = vd.select(head, config), vd.select(tokens, config)
    mask = kept_layout(order.cpu(), sg.kept.cpu())
    places = torch.cat([sb.kept.cpu(), mask.nonzero().flatten() + base])
    embeds = pack(sb.take(head), sg.take(tokens), mask.to(packed.device), order, newline)
    return embeds, places
