"""KV dropping under a token budget (``kv_keep_tokens``), while decoding: the scheduler's side.

A scored policy re-scores the request's kept context whenever it is a block over the budget
(:class:`~flopwise.techniques.kv_drop.Compaction`; the worker compacts, :mod:`flopwise_vllm.kv_drop`);
StreamingLLM, and every policy where the cache cannot be read back, evicts the oldest full tail block
instead. :class:`TokenBudget` is the part of :class:`~flopwise_vllm.kv_planner.KVPlanner` that does it;
:class:`KVState` is what the planner keeps per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.v1.request import Request

from flopwise.techniques import kv_drop as kd
from flopwise_vllm.kv_state import KVJob, Rescore


@dataclass
class KVState:
    """A request's KV dropping: its options, where its prefill started, what it reads once dropped."""

    config: kd.KVDropConfig
    rescores: bool  # re-scored while decoding under a token budget (else evicted by position)
    first: int | None = None  # tokens computed before its first prefill chunk (prefix-cache hits)
    layout: kd.Layout | None = None  # sent to the worker with the last prefill chunk
    applied: bool = False  # the step ran: later steps attend to the kept context only
    stashed: bool = False  # earlier prefill chunks were sent to the worker to keep
    fresh: list = field(default_factory=list)  # pool blocks taken for the kept tokens, not yet the request's
    dest: tuple[int, ...] = ()  # the blocks holding compacted kept tokens, in order (KVJob.dest)
    resume: int = 0  # from this block of its list on, the request reads its blocks as they are
    evicted: int = 0  # tail blocks evicted while decoding (token budget, by position)
    compaction: kd.Compaction | None = None  # a re-scoring in this step, applied after it
    decode_dropped: int = 0  # tokens re-scoring dropped while decoding
    compactions: int = 0

    @property
    def window(self) -> int:
        """Recent queries the worker keeps for this request's re-scorings."""
        return kd.get_policy(self.config.policy).decode_window if self.rescores else 0


def kv_stats(lay: kd.Layout, reason: str | None = None) -> dict:
    """``usage.flops.kv``: what the drop kept; ``reason`` says why nothing was dropped."""
    stats = {
        "prompt_tokens": lay.prompt,
        "kept_tokens": lay.kept_tokens,
        "dropped_tokens": lay.dropped_tokens,
        "dropped_blocks": lay.dropped_blocks,
    }
    return stats if reason is None else {**stats, "reason": reason}


UNSUPPORTED = (
    "this engine cannot drop KV (it needs flopwise's KV worker, full attention, an unquantized cache)"
)
TOO_SHORT = "nothing to drop: the prompt's kept share covers every whole block"
NO_BLOCKS = "nothing dropped: no free or unshared block to write the kept tokens to"


class TokenBudget:
    """Decode-time eviction and re-scoring (mixed into the planner: its scheduler, accountant, blocks)."""

    def _compaction(self, kv: KVState, cached: int) -> kd.Compaction | None:
        bs = self.scheduler.block_size
        return kd.compaction(len(kv.dest), kv.resume, cached, kv.config.tokens, bs, kv.window)

    def _evict(self, request: Request, kv: KVState, cached: int, jobs: dict[str, KVJob]) -> None:
        """Free the oldest tail blocks that put the request's KV a block over its token budget."""
        lay, before = kv.layout, kv.evicted
        while kd.evicts(lay, kv.evicted, cached, kv.config.tokens):
            kv.evicted += 1
        if kv.evicted == before:
            return
        rid = request.request_id
        for manager in self.scheduler.kv_cache_manager.coordinator.single_type_managers:
            manager._remove_blocks_in_range(rid, lay.full + before, lay.full + kv.evicted)
        kv.resume = lay.full + kv.evicted
        jobs[rid] = KVJob(kv.config.policy, kv.first, lay.prompt, dest=kv.dest, resume=kv.resume)
        self.accountant.set_kv_stats(rid, {**kv_stats(lay), "evicted_tokens": kv.evicted * lay.block_size})

    def _rescore(self, request: Request, kv: KVState, jobs: dict[str, KVJob]) -> None:
        """A re-scoring this step (after its attention) when the kept KV is a block over the budget."""
        comp = self._compaction(kv, request.num_computed_tokens)
        if comp is None:
            return
        bs, rid = self.scheduler.block_size, request.request_id
        tail = self._blocks(rid)[kv.resume : -(-comp.cached // bs)]
        sources = kv.dest + tuple(b.block_id for b in tail)
        kv.compaction = comp
        jobs[rid] = KVJob(
            kv.config.policy,
            kv.first,
            request.num_prompt_tokens,
            dest=kv.dest,
            resume=kv.resume,
            window=kv.window,
            rescore=Rescore(sources, comp, sources[: comp.new_kept]),
        )
        self.accountant.charge_extra(request, "kv_scoring", self._scoring(kv, comp.rows, True).total, True)

    def _apply_rescore(self, rid: str, kv: KVState, rescore: Rescore) -> None:
        comp = rescore.compaction
        self._reorder(rid, comp.new_resume, rescore.dest, [])
        kv.dest, kv.resume, kv.compaction = rescore.dest, comp.new_resume, None
        kv.decode_dropped += comp.dropped_tokens
        kv.compactions += 1
        stats = {
            **kv_stats(kv.layout),
            "decode_dropped_tokens": kv.decode_dropped,
            "compactions": kv.compactions,
        }
        self.accountant.set_kv_stats(rid, stats)
