"""Visual token dropping: keep the most important image tokens before the language model sees them.

Shared mechanics for the methods (one per file: :mod:`.visiondrop`, :mod:`.cls_attention`,
:mod:`.uniform_drop`, :mod:`.divprune`, :mod:`.visionzip`, :mod:`.cdpruner`): the request options
(``visual_keep``, ``visual_drop``), how many tokens a keep ratio leaves, the :class:`Selection` a method
returns, and Qwen's M-RoPE positions for the tokens kept. Kept tokens keep their original positions (their
place in the image grid), so dropping changes which tokens the language model attends to, never where they
are (on Qwen; LLaVA's 1-D positions are renumbered by vLLM); a
merging method's new token sits at the place of the token it was merged into.

Both the vLLM models (:mod:`flopwise_vllm.visual_drop`) and the transformers reference
(:mod:`flopwise.hf.visual`) call :func:`select`, so the two paths keep the same tokens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from flopwise.techniques import OptionError, Registry, fraction

KEEP_FIELD = "visual_keep"
METHOD_FIELD = "visual_drop"
LAYER_FIELD = "visual_drop_layer"
FIELDS = (KEEP_FIELD, METHOD_FIELD, LAYER_FIELD)  # a request's options, in parse_options' order
# Not a request option: the engine's processor sets it to the request's instruction ids for methods that
# read the text (:attr:`VisualMethod.uses_text`), so they travel to the model with the pixels.
QUERY_FIELD = "visual_query"
DEFAULT_METHOD = "visiondrop"


@dataclass(frozen=True)
class Selection:
    """What the language model sees of an image's N tokens: ``kept`` (ascending indices, the places the
    slots take) and, for a merging method, ``weights`` [k, N] — slot i holds ``weights[i] @ features``, a
    new embedding rather than a copy of token ``kept[i]``."""

    kept: torch.Tensor
    weights: torch.Tensor | None = None

    def take(self, features: torch.Tensor) -> torch.Tensor:
        """The k slots' embeddings from the image's features [N, D] (any feature space of the N tokens)."""
        if self.weights is None:
            return features[self.kept.to(features.device)]
        return self.weights.to(device=features.device, dtype=features.dtype) @ features


@dataclass(frozen=True)
class VisualMethod(ABC):
    """Chooses which of an image's tokens (or merges of them) the language model sees."""

    # True: the method reads the request's instruction, so it gets ``tokens`` in the language model's
    # embedding space (the projector's output) and ``text``, the instruction's token embeddings.
    uses_text: ClassVar[bool] = False

    @abstractmethod
    def select(
        self,
        tokens: torch.Tensor,
        k: int,
        query: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
    ) -> Selection:
        """``tokens`` [N, D] float32 features of one image (``query`` [D]: its CLS token, if the tower has
        one; ``text`` [M, D]: see :attr:`uses_text`) -> a Selection of ``k`` < N slots."""


@dataclass(frozen=True)
class VisualScorer(VisualMethod):
    """Scores image tokens; the highest-scoring ``k`` survive."""

    @abstractmethod
    def score(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` [N, D] -> [N]."""

    def select(self, tokens, k, query=None, text=None) -> Selection:
        return Selection(top_k(self.score(tokens, query), k))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest scores' indices, ascending. A stable sort (ties to the lower index) so the HF
    reference and the engine agree on ties."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


def method_names() -> list[str]:
    return _METHODS.names()


def get_method(name: str) -> VisualMethod:
    return _METHODS.get(name)


class VisualDropConfig(BaseModel):
    """A request's visual token dropping: ``visual_keep`` and ``visual_drop`` (server defaults otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: float = Field(
        1.0, gt=0, le=1, description="Fraction of each image's tokens the language model sees."
    )
    method: str = Field(
        DEFAULT_METHOD,
        description="Method: visiondrop, cls_attention, divprune, visionzip, uniform or random.",
    )
    layer: int | None = Field(
        None,
        ge=0,
        description="LLaVA: drop inside the vision tower, after this many of its "
        "layers (the rest run on the kept tokens only); None: after the tower.",
    )

    @property
    def active(self) -> bool:
        return self.keep < 1.0

    @property
    def code(self) -> int:
        """The method as a number: the engine carries it as a tensor next to the pixels."""
        return method_names().index(self.method)

    @classmethod
    def from_code(cls, keep: float, code: int, layer: int = -1) -> VisualDropConfig:
        """Back from the engine's tensors (``layer`` -1: after the tower)."""
        return cls(keep=keep, method=method_names()[int(code)], layer=None if layer < 0 else int(layer))


class VisualDropError(OptionError):
    """A bad visual-dropping option; ``field`` names it (``visual_keep``, ``visual_drop``,
    ``visual_drop_layer``)."""


_METHODS = Registry(
    f"{METHOD_FIELD} method",
    METHOD_FIELD,
    VisualDropError,
    tuple(
        f"flopwise.techniques.{m}"
        for m in ("cdpruner", "cls_attention", "divprune", "uniform_drop", "visiondrop", "visionzip")
    ),
)
register = _METHODS.register


def parse_options(keep=None, method=None, layer=None) -> VisualDropConfig:
    """Validate a request's ``visual_keep`` / ``visual_drop`` / ``visual_drop_layer`` (unset: keep all,
    visiondrop, after the tower; the server's defaults are applied by :func:`flopwise.options.parse`)."""
    if keep is None:
        keep = 1.0
    if method is None:
        method = DEFAULT_METHOD
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise VisualDropError(
            f"{LAYER_FIELD} must be a non-negative integer (a vision-tower layer), got {layer!r}", LAYER_FIELD
        )
    keep = fraction(keep, KEEP_FIELD, VisualDropError)
    get_method(method)  # an unknown method raises, naming the field
    return VisualDropConfig(keep=keep, method=method, layer=layer)


def _rounded(tokens: int, keep: float) -> int:
    return int(math.floor(keep * tokens + 0.5))  # halves round up, unlike round()


def keep_count(tokens: int, keep: float) -> int:
    """Tokens kept of an image of ``tokens`` tokens: ``keep * tokens`` rounded; zero is an error."""
    if keep >= 1.0:
        return tokens
    k = _rounded(tokens, keep)
    if k < 1:
        raise VisualDropError(
            f"{KEEP_FIELD}={keep} keeps no token of an image of {tokens} tokens "
            f"(needs at least {1 / tokens:.4f})",
            KEEP_FIELD,
        )
    return k


def tokens_before(kept: int, keep: float) -> int:
    """The fewest tokens an image can have had for ``keep`` to leave ``kept`` of them."""
    if keep >= 1.0:
        return kept
    n = max(kept, math.ceil((kept - 0.5) / keep) - 1)
    while _rounded(n, keep) < kept:
        n += 1
    return n


def select(
    tokens: torch.Tensor,
    config: VisualDropConfig,
    query: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
) -> Selection:
    """What ``config`` keeps of one image's features ``tokens`` [N, D] (scored in float32)."""
    n = tokens.shape[0]
    k = keep_count(n, config.keep)
    if k == n:
        return Selection(torch.arange(n, device=tokens.device))
    query, text = (None if t is None else t.float() for t in (query, text))
    return get_method(config.method).select(tokens.float(), k, query, text)


def uses_text(config: VisualDropConfig) -> bool:
    return config.active and get_method(config.method).uses_text


def instruction_ids(ids: list[int], image_id: int, special: set[int]) -> list[int]:
    """The instruction a query-aware method reads: the prompt's tokens around the (first) run of image
    placeholders, up to the nearest special token on each side (in a chat prompt, the user's turn that holds
    the image), placeholders excluded. The same ids whether the placeholder is one token (vLLM's prompt
    before its update) or expanded (the transformers processor's)."""
    if image_id not in ids:
        return []
    first = ids.index(image_id)
    last = first
    while last + 1 < len(ids) and ids[last + 1] == image_id:
        last += 1
    lo, hi = first, last + 1
    while lo > 0 and ids[lo - 1] not in special:
        lo -= 1
    while hi < len(ids) and ids[hi] not in special:
        hi += 1
    return ids[lo:first] + ids[last + 1 : hi]


def group_mean(patches: torch.Tensor, merge: int) -> torch.Tensor:
    """Qwen2-VL orders patches so that each ``merge``x``merge`` window (one LM token) is contiguous."""
    return patches.reshape(-1, merge * merge, patches.shape[-1]).mean(1)


def mrope_positions(
    input_len: int, images: list[tuple[int, tuple[int, int, int], np.ndarray | None]]
) -> tuple[np.ndarray, int]:
    """Qwen2-VL's 3-D M-RoPE positions of a prompt whose images keep only some tokens.

    ``images``: (placeholder offset, LM grid (t, h, w), kept indices or None for all) per image, in order.
    Image tokens get their (t, h, w) grid coordinates, so a kept token sits where it was in the image; text
    runs get consecutive positions after the whole grid, kept or not (vLLM's and transformers' rule for a
    full image), so the text's positions never depend on which tokens were kept (as the papers' Qwen code
    does: positions of the full prompt, then the dropped tokens removed). That is also what lets vLLM's
    worker place the text after an image whose pixels it no longer has (a prefix-cache hit).
    Returns positions [3, input_len] and the delta decode positions add (next position - ``input_len``).
    """
    parts: list[np.ndarray] = []
    st = start = 0  # st: the next placeholder index; start: the next text position
    for offset, (t, h, w), kept in images:
        text = offset - st
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + start)
        grid = np.indices((t, h, w)).reshape(3, -1) + text + start
        start = int(grid.max()) + 1
        if kept is not None:
            grid = grid[:, kept]
        parts.append(grid)
        st = offset + grid.shape[1]
    tail = input_len - st
    parts.append(np.broadcast_to(np.arange(tail), (3, tail)) + start)
    pos = np.concatenate(parts, axis=1).reshape(3, -1)
    return pos, start + tail - input_len
