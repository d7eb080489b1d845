"""KV-cache token dropping: after a prompt is prefilled, keep only the most useful keys/values of it.

Shared mechanics for the policies (one per file: :mod:`.streaming_llm`, :mod:`.snapkv`, :mod:`.h2o`,
:mod:`.knorm`, :mod:`.random_kv`): the request options (``kv_policy``, ``kv_keep`` ratio or
``kv_keep_tokens`` budget), the paged layout a drop leaves, and per-head top-k selection.

The layout is what makes this work in a paged cache. A prompt of P tokens fills blocks of ``block_size``
tokens; three regions:

* ``protected`` blocks at the start, kept verbatim (none when a drop is made: the engine drops over the
  whole prompt, copying out of blocks it shares with others; a layout that drops nothing protects all);
* the *compressible* region, the blocks after them that the prompt fills entirely: the policy picks
  which of its tokens to keep, per layer and KV head, and they are written compacted into ``kept``
  blocks (a whole number of blocks, so attention never reads a slot that holds no kept token); the
  region's other blocks go back to the pool;
* the *tail*: the prompt's last partial block and everything generated after it, kept, except under a
  token budget (``kv_keep_tokens``): there a scored policy re-scores the kept blocks and the tail's older
  blocks whenever they are a block over the budget and compacts the best (:class:`Compaction`), and
  StreamingLLM evicts the oldest full tail block (:func:`evicts`), so a request's KV stays within about
  the budget however long it runs.

Kept keys keep the RoPE rotation of their original position (keys are cached rotated), and new tokens
keep their original positions, so nothing is re-indexed. Both the vLLM adapter
(:mod:`flopwise_vllm.kv_drop`) and the transformers reference (:mod:`flopwise.hf.kv`) call :func:`layout` and
:func:`keep_indices`, so the two paths keep the same tokens.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from flopwise.techniques import OptionError, Registry, fraction

POLICY_FIELD = "kv_policy"
KEEP_FIELD = "kv_keep"
TOKENS_FIELD = "kv_keep_tokens"
FIELDS = (POLICY_FIELD, KEEP_FIELD, TOKENS_FIELD)
DEFAULT_POLICY = "snapkv"


@dataclass(frozen=True)
class KVContext:
    """What a policy sees for one layer of one request: the prompt's keys and the queries it asked for."""

    keys: torch.Tensor  # [P - offset, kv_heads, head_dim]: positions offset..P-1, rotated (as cached)
    queries: torch.Tensor | None  # [W, q_heads, head_dim], rotated: the prompt's last W queries
    start: int  # the compressible region [start, end) of positions
    end: int
    offset: int = 0  # the first position the request computed itself (after its prefix-cache hits)
    layer: int = 0
    seed: int = 0

    @property
    def prompt_len(self) -> int:
        return self.offset + self.keys.shape[0]

    @property
    def rel(self) -> slice:
        """The region as rows of ``keys``."""
        return slice(self.start - self.offset, self.end - self.offset)


@dataclass(frozen=True)
class KVPolicy(ABC):
    """Scores a prompt's tokens per KV head; the highest scores in the compressible region are kept."""

    # Queries the policy needs: 0 none, None every query the request computed, W the last W.
    query_window = 0
    rescores = True  # under a token budget, re-scored while decoding (False: the oldest blocks are evicted)

    def queries_of(self, queries: torch.Tensor | None) -> torch.Tensor | None:
        """The part of ``queries`` (oldest first) this policy reads."""
        w = self.query_window
        if w == 0 or queries is None:
            return None
        return queries if w is None else queries[-w:]

    @property
    def min_tokens(self) -> int:
        """The fewest tokens this policy can keep (its sinks + window)."""
        return 1

    @abstractmethod
    def score(self, ctx: KVContext) -> torch.Tensor:
        """-> [kv_heads, end - start] scores of the compressible region's tokens (higher = keep)."""

    def scoring_flops(self, prompt: int, q_heads: int, head_dim: int) -> int:
        """Matmul FLOPs of one layer's scoring (charged to the request)."""
        return 0

    @property
    def decode_window(self) -> int:
        """The recent queries a decode-time re-scoring reads."""
        return self.query_window or 0

    def decode_scoring_flops(self, rows: int, q_heads: int, head_dim: int) -> int:
        """Matmul FLOPs of one layer's decode-time re-scoring of ``rows`` kept keys: the window's QK^T."""
        return 2 * q_heads * head_dim * self.decode_window * rows


def policy_names() -> list[str]:
    return _POLICIES.names()


def get_policy(name: str) -> KVPolicy:
    return _POLICIES.get(name)


class KVDropError(OptionError):
    """A bad KV-dropping option; ``field`` names it (``kv_policy``, ``kv_keep``, ``kv_keep_tokens``)."""


_POLICIES = Registry(
    POLICY_FIELD,
    POLICY_FIELD,
    KVDropError,
    tuple(
        f"flopwise.techniques.{m}" for m in ("h2o", "knorm", "random_kv", "snapkv", "streaming_llm", "tova")
    ),
)
register = _POLICIES.register


class KVDropConfig(BaseModel):
    """A request's KV dropping: a policy and how much of the prompt's KV to keep (ratio or token budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(DEFAULT_POLICY, description="snapkv, tova, h2o, streaming_llm, knorm or random.")
    keep: float = Field(1.0, gt=0, le=1, description="Fraction of the prompt's tokens whose KV is kept.")
    tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget for the request's KV, instead of keep: the prompt is cut to it, and "
        "while generating a scored policy re-scores the kept context each time it is a block over the budget "
        "(StreamingLLM evicts its oldest blocks).",
    )

    @property
    def active(self) -> bool:
        return self.tokens is not None or self.keep < 1.0

    def target(self, prompt: int) -> int:
        """Prompt tokens to keep, never fewer than the policy needs."""
        want = self.tokens if self.tokens is not None else math.ceil(self.keep * prompt)
        return min(prompt, max(want, get_policy(self.policy).min_tokens))

    def as_extra(self) -> dict:
        """The options as ``SamplingParams.extra_args`` entries."""
        if self.tokens is not None:
            return {POLICY_FIELD: self.policy, TOKENS_FIELD: self.tokens}
        return {POLICY_FIELD: self.policy, KEEP_FIELD: self.keep}


def parse_options(policy=None, keep=None, tokens=None) -> KVDropConfig:
    """Validate a request's ``kv_policy`` / ``kv_keep`` / ``kv_keep_tokens`` (unset: snapkv, keep all; the
    server's defaults are applied by :func:`flopwise.options.parse`). Raises :class:`KVDropError` naming
    the field."""
    if policy is None:
        policy = DEFAULT_POLICY
    if keep is None and tokens is None:
        keep = 1.0
    if keep is not None and tokens is not None:
        raise KVDropError(f"give {KEEP_FIELD} or {TOKENS_FIELD}, not both", TOKENS_FIELD)
    chosen = get_policy(policy)  # an unknown policy raises, naming the field
    if keep is not None:
        return KVDropConfig(policy=policy, keep=fraction(keep, KEEP_FIELD, KVDropError))
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise KVDropError(f"{TOKENS_FIELD} must be a positive integer, got {tokens!r}", TOKENS_FIELD)
    if tokens < chosen.min_tokens:
        raise KVDropError(
            f"{TOKENS_FIELD}={tokens} is below the {chosen.min_tokens} tokens {policy} needs "
            f"(its sinks + window)",
            TOKENS_FIELD,
        )
    return KVDropConfig(policy=policy, tokens=tokens)


@dataclass(frozen=True)
class Layout:
    """Where a prompt's kept KV sits in its blocks after the drop (see the module docstring)."""

    prompt: int
    block_size: int
    protected: int  # blocks kept verbatim at the start
    full: int  # blocks the prompt fills entirely
    kept: int  # blocks of the compressible region [protected, full) left, holding its kept tokens

    @property
    def region(self) -> tuple[int, int]:
        """Token positions [start, end) the policy chooses from."""
        return self.protected * self.block_size, self.full * self.block_size

    @property
    def kept_region_tokens(self) -> int:
        return self.kept * self.block_size

    @property
    def dropped_blocks(self) -> int:
        return self.full - self.protected - self.kept

    @property
    def dropped_tokens(self) -> int:
        return self.dropped_blocks * self.block_size

    @property
    def kept_tokens(self) -> int:
        return self.prompt - self.dropped_tokens

    @property
    def active(self) -> bool:
        return self.dropped_blocks > 0

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return self.prompt, self.block_size, self.protected, self.full, self.kept


def layout(config: KVDropConfig, prompt: int, block_size: int, protected_blocks: int = 0) -> Layout:
    """The layout ``config`` leaves for a ``prompt``-token prompt whose first ``protected_blocks`` blocks
    must stay as they are. The region keeps whole blocks, rounded up: never fewer tokens than asked."""
    full = prompt // block_size
    protected = min(protected_blocks, full)
    outside = protected * block_size + (prompt - full * block_size)
    need = max(0, config.target(prompt) - outside)
    kept = min(full - protected, math.ceil(need / block_size))
    return Layout(prompt, block_size, protected, full, kept)


def evicts(lay: Layout, evicted: int, cached: int, budget: int) -> bool:
    """Decode-time eviction under a token budget (``kv_keep_tokens``): with ``cached`` tokens in the
    cache and ``evicted`` tail blocks already gone, does the oldest tail block go too? It does when the
    kept KV is a whole block over the budget and the block is full and not the newest full one, so the
    kept prompt (the policy's choice, StreamingLLM's sinks) stays and a recent window slides behind it."""
    block = lay.full + evicted
    kept = cached - lay.dropped_tokens - evicted * lay.block_size
    return kept - lay.block_size >= budget and (block + 2) * lay.block_size <= cached


SINKS = 4  # the oldest kept tokens of each head survive every decode-time re-scoring (attention sinks)


@dataclass(frozen=True)
class Compaction:
    """One decode-time re-scoring under a token budget (``kv_keep_tokens``).

    A request's KV is, in its block list, ``kept`` blocks of compacted tokens (each head's, oldest first)
    followed by the tail from block ``resume`` on, as computed. When the kept KV is a block or more over
    the budget, the policy re-scores the kept blocks plus the tail's blocks before ``new_resume`` (the
    *candidates*) with the last ``decode_window`` queries, and the best per head are compacted into
    ``new_kept`` blocks; the tail from ``new_resume`` on (the recent window, at least the queries') stays
    as it is, and so do the first :data:`SINKS` candidates of each head. Rows below count tokens in this
    order, the same in the engine's blocks and the transformers reference's cache."""

    block_size: int
    kept: int
    resume: int
    cached: int  # tokens in the cache, this step's included
    new_resume: int
    new_kept: int

    @property
    def candidates(self) -> int:
        """Rows re-scored: the kept blocks' and the tail's before ``new_resume``."""
        return (self.kept + self.new_resume - self.resume) * self.block_size

    @property
    def rows(self) -> int:
        """Rows attended before the re-scoring: the candidates and the recent window."""
        return self.kept * self.block_size + self.cached - self.resume * self.block_size

    @property
    def dropped_tokens(self) -> int:
        return self.candidates - self.new_kept * self.block_size


def compaction(
    kept: int, resume: int, cached: int, budget: int, block_size: int, window: int
) -> Compaction | None:
    """The re-scoring a request with ``cached`` tokens makes now, or None while it is within a block of
    ``budget`` (see :class:`Compaction`)."""
    new_resume = (cached - max(window, 1)) // block_size
    if new_resume <= resume:
        return None
    recent = cached - new_resume * block_size
    candidates = kept + new_resume - resume
    new_kept = min(candidates, max(math.ceil((budget - recent) / block_size), 1))
    if new_kept >= candidates:
        return None
    return Compaction(block_size, kept, resume, cached, new_resume, new_kept)


def keep_indices(policy: KVPolicy, ctx: KVContext, count: int, sinks: int = 0) -> torch.Tensor:
    """[kv_heads, count] positions (absolute, ascending per head) ``policy`` keeps of the region, its first
    ``sinks`` always among them."""
    scores = policy.score(ctx).float()
    if sinks:
        scores = scores.clone()  # (a policy may return one row expanded over the heads)
        scores[:, :sinks] = float("inf")
    # A stable sort (ties to the lower position) so the reference and the engine agree on ties.
    order = torch.sort(-scores, dim=-1, stable=True).indices[:, :count]
    return torch.sort(order, dim=-1).values + ctx.start


def window_attention(keys: torch.Tensor, queries: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Attention the last W ``queries`` [W, Hq, d] pay each of ``keys`` [P, Hkv, d] (the queries sit at the
    keys' last W positions): causal softmax, summed over the queries, averaged over each KV head's query
    group -> [kv_heads, P], float32. Chunks of queries only see the keys before them; the softmax runs in
    place (exp(logit - logsumexp)) and only a chunk's own keys need the causal mask."""
    P, kv_heads, d = keys.shape
    W, q_heads, _ = queries.shape
    group = q_heads // kv_heads
    k = keys.float().permute(1, 2, 0)  # [Hkv, d, P]
    total = torch.zeros(kv_heads, P)
    for s in range(0, W, chunk):
        q = queries[s : s + chunk].float() / math.sqrt(d)
        w = q.shape[0]
        first, seen = P - W + s, P - W + s + w  # the chunk's queries sit at positions [first, seen)
        q = q.reshape(w, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * w, d)
        logits = torch.bmm(q, k[:, :, :seen])  # [Hkv, group * w, seen]; rows group-major
        ahead = torch.ones(w, w, dtype=torch.bool).triu(1).repeat(group, 1)  # row g*w+j: keys after query j
        logits[:, :, first:].masked_fill_(ahead, float("-inf"))
        logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()
        total[:, :seen] += logits.sum(1) / group
    return total
