"""KV dropping, the scheduler's side: where each request's drop goes, and which blocks go back to the pool.

When a request's last prefill chunk is scheduled, the planner fixes its
:class:`~flopwise.techniques.kv_drop.Layout` over the whole prompt, picks the blocks its kept tokens are
written to and attaches a :class:`~flopwise_vllm.kv_state.KVJob` to the scheduler output for the worker
(:mod:`flopwise_vllm.kv_drop` does the compaction). After that step the request's block list becomes
[kept blocks, tail] and the rest goes back to the pool.

Under a token budget (``kv_keep_tokens``) the KV stays within about the budget however long the request
generates: a scored policy re-scores its kept context whenever it is a block over the budget
(:class:`~flopwise.techniques.kv_drop.Compaction`: kept blocks + the tail before the recent window, with the
last ``decode_window`` queries, which the worker keeps), and the best tokens are compacted into the first of
those blocks, the rest freed; StreamingLLM (and any policy where the cache cannot be read back) evicts the
oldest full tail block instead. Either way a request reads [kept blocks, tail from ``resume``].

Prefix-cache hits are dropped by copy: blocks the request shares (hits, or blocks another request hit) are
read, never rewritten, and stay cached for the others. The kept tokens go to fresh blocks when the pool has
them (so a cold request's own prompt blocks stay cached too: many questions over one document each hit it),
else into the request's own unshared prompt blocks. A hit never covers the policy's query window (those
queries are recomputed, and charged, :meth:`KVPlanner.cap_hit`); a policy with no window (every prompt
query) and engines whose cache layout cannot be read back recompute the whole prompt. Blocks written after
a drop are never cached: their KV attended to the kept context only. The accountant asks the planner how much
context a request's attention no longer reads (:meth:`KVPlanner.context_cut`), and the budget gate what
scoring the next step will charge (:meth:`KVPlanner.pending_scoring`).
"""

from __future__ import annotations

import dataclasses
import logging

from vllm.v1.request import Request

from flopwise.ledger import Breakdown, FlopModel
from flopwise.techniques import kv_drop as kd
from flopwise_vllm.accountant import Accountant
from flopwise_vllm.kv_budget import (
    NO_BLOCKS,
    TOO_SHORT,
    UNSUPPORTED,
    KVState,
    TokenBudget,
    kv_stats,
)
from flopwise_vllm.kv_state import OUTPUT_ATTR, KVJob

logger = logging.getLogger("flopwise")

NULL_CACHED = 1 << 62  # a request's cached-block count that stops vLLM caching its later blocks


class KVPlanner(TokenBudget):
    def __init__(
        self, scheduler, flop_model: FlopModel, accountant: Accountant, supported: bool, readable: bool
    ):
        self.scheduler = scheduler  # its kv_cache_manager and block_size
        self.model = flop_model
        self.accountant = accountant
        self.supported = supported
        self.readable = readable  # the worker can read cached KV back (kv_drop.readable_isa)
        self.states: dict[str, KVState] = {}

    def open(self, request: Request, config: kd.KVDropConfig | None) -> None:
        if config is None:
            return
        if not self.supported:
            logger.warning(
                "request %s: KV dropping needs flopwise's KV worker, full attention and an unquantized "
                "KV cache; ignored",
                request.request_id,
            )
            lay = kd.layout(kd.KVDropConfig(), request.num_prompt_tokens, self.scheduler.block_size)
            self.accountant.set_kv_stats(request.request_id, kv_stats(lay, UNSUPPORTED))
            return
        rescores = config.tokens is not None and kd.get_policy(config.policy).rescores and self.readable
        self.states[request.request_id] = KVState(config, rescores)

    def forget(self, request_id: str) -> None:
        kv = self.states.pop(request_id, None)
        if kv is not None:
            self._release_fresh(kv)

    def _release_fresh(self, kv: KVState) -> None:
        if kv.fresh:  # the request ended before the step that filled them
            self.scheduler.kv_cache_manager.block_pool.free_blocks(kv.fresh)
            kv.fresh = []

    def cap_hit(self, request: Request, blocks, hit: int):
        """Trim a prefix-cache hit of a request that drops so the policy's queries are computed -> (blocks,
        hit). The last ``query_window`` prompt tokens are recomputed (all of them for a policy whose
        window is None, or where the cache cannot be read back); other policies read every hit."""
        kv = self.states.get(request.request_id)
        if kv is None or not hit or not kv.config.active:
            return blocks, hit
        window = kd.get_policy(kv.config.policy).query_window
        prompt, bs = request.num_prompt_tokens, self.scheduler.block_size
        if window is None or not self.readable:
            cap = 0
        else:
            cap = max(0, (prompt - max(window, kv.window)) // bs * bs)
        if hit <= cap:
            return blocks, hit
        return self.scheduler.kv_cache_manager.truncate_computed_blocks(blocks, cap), cap

    # -- what the accountant and the gate ask ------------------------------------------------------
    def context_cut(self, request: Request, start: int) -> int:
        """Context tokens a step of ``request`` from ``start`` no longer attends to."""
        kv = self.states.get(request.request_id)
        if kv is None or not kv.applied or start < kv.layout.prompt:
            return 0
        return (kv.resume - len(kv.dest)) * self.scheduler.block_size

    def pending_scoring(self, request: Request) -> int:
        """Scoring FLOPs the request's next step may charge: a drop not made yet scores its whole prompt, as
        :meth:`_plan_one` charges it, unless its layout keeps nothing of the region or drops nothing; while
        decoding under a budget, the re-scoring that step would make (:meth:`_rescore`)."""
        kv = self.states.get(request.request_id)
        if kv is not None and kv.applied and kv.rescores:
            comp = self._compaction(kv, request.num_computed_tokens + 1)
            return self._scoring(kv, comp.rows, decode=True).total if comp is not None else 0
        if kv is None or kv.layout is not None or kv.applied:
            return 0
        lay = kd.layout(kv.config, request.num_prompt_tokens, self.scheduler.block_size)
        if not (lay.active and lay.kept):
            return 0
        return self._scoring(kv, request.num_prompt_tokens).total

    def _scoring(self, kv: KVState, tokens: int, decode: bool = False) -> Breakdown:
        policy, scoring = kd.get_policy(kv.config.policy), Breakdown()
        cost = policy.decode_scoring_flops if decode else policy.scoring_flops
        for layer in self.model.spec.layers:
            scoring.add("kv_scoring", cost(tokens, layer.q_heads, layer.head_dim))
        return scoring

    # -- each step ---------------------------------------------------------------------------------
    def plan(self, out, requests: dict[str, Request]) -> None:
        """Attach this step's KV jobs to the scheduler output (see :mod:`flopwise_vllm.kv_drop`)."""
        if not self.states:
            return
        for rid in out.preempted_req_ids or ():
            if rid in self.states:  # its blocks are gone; it prefills (and drops) again
                old = self.states[rid]
                self._release_fresh(old)
                self.states[rid] = KVState(old.config, old.rescores)
        jobs: dict[str, KVJob] = {}
        for rid, n in out.num_scheduled_tokens.items():
            kv = self.states.get(rid)
            if kv is not None:
                self._plan_one(requests[rid], kv, n, jobs)
        if jobs:
            setattr(out, OUTPUT_ATTR, jobs)

    def _plan_one(self, request: Request, kv: KVState, n: int, jobs: dict[str, KVJob]) -> None:
        rid, prompt, block_size = request.request_id, request.num_prompt_tokens, self.scheduler.block_size
        start = request.num_computed_tokens - n  # vLLM has advanced num_computed_tokens already
        if start >= prompt:  # decoding: keep within a token budget
            if kv.applied and kv.config.tokens is not None:
                if kv.rescores:
                    self._rescore(request, kv, jobs)
                else:
                    self._evict(request, kv, start, jobs)
            return
        if kv.first is None:
            kv.first = start
        job = KVJob(kv.config.policy, kv.first, prompt, window=kv.window)
        if request.num_computed_tokens < prompt:  # an earlier chunk: the worker stashes it
            kv.stashed = kv.stashed or kd.layout(kv.config, prompt, block_size).active
            if kv.stashed or kv.window:
                jobs[rid] = dataclasses.replace(job, stash=kv.stashed)
            return
        lay = kd.layout(kv.config, prompt, block_size)
        dest = self._destinations(request, kv, lay) if lay.active else ()
        if dest is None or not lay.active:
            reason = TOO_SHORT if dest is not None else NO_BLOCKS
            lay = kd.layout(kv.config, prompt, block_size, prompt // block_size)  # keeps every block
            if kv.config.tokens is not None:  # the budget still holds while generating
                kv.layout, kv.applied = lay, True
                if not kv.rescores:  # evicting reads the prompt's blocks as they are, then the tail
                    kv.dest, kv.resume = tuple(b.block_id for b in self._blocks(rid)[: lay.full]), lay.full
            if kv.stashed or kv.window:  # the worker lets its stash go, and starts the query window
                jobs[rid] = dataclasses.replace(job, layout=lay, dest=kv.dest, resume=kv.resume)
            self.accountant.set_kv_stats(rid, kv_stats(lay, reason))
            return
        kv.layout, kv.dest, kv.resume = lay, dest, lay.full
        jobs[rid] = dataclasses.replace(job, layout=lay, dest=dest, resume=lay.full)
        if lay.kept:  # the whole region going is not scored
            self.accountant.charge_extra(request, "kv_scoring", self._scoring(kv, prompt).total)

    def _blocks(self, rid: str) -> list:
        return self.scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[rid]

    def _destinations(self, request: Request, kv: KVState, lay: kd.Layout) -> tuple[int, ...] | None:
        """The blocks the kept tokens go to: fresh ones from the pool, else the request's own unshared
        prompt blocks (taken out of the prefix cache: they are rewritten); None if neither suffices."""
        pool = self.scheduler.kv_cache_manager.block_pool
        if pool.get_num_free_blocks() >= lay.kept:
            kv.fresh = pool.get_new_blocks(lay.kept)
            return tuple(b.block_id for b in kv.fresh)
        blocks = self._blocks(request.request_id)
        own = [b for b in blocks[kv.first // lay.block_size : lay.full] if b.ref_cnt == 1]
        if len(own) < lay.kept:
            return None
        for block in own[: lay.kept]:
            pool._maybe_evict_cached_block(block)
        return tuple(b.block_id for b in own[: lay.kept])

    def apply(self, scheduler_output) -> None:
        """After the step that dropped (or re-scored): the request's blocks become [kept, tail]; the rest go
        back to the pool (cached ones stay cached)."""
        for rid, job in (getattr(scheduler_output, OUTPUT_ATTR, None) or {}).items():
            kv = self.states.get(rid)
            if kv is None:
                continue
            if job.rescore is not None and kv.compaction is job.rescore.compaction:
                self._apply_rescore(rid, kv, job.rescore)
                continue
            lay = job.layout
            if lay is None or not lay.active or kv.layout is not lay or kv.applied:
                continue  # (an eviction update is applied when planned)
            self._reorder(rid, lay.full, job.dest, kv.fresh)
            kv.fresh, kv.applied = [], True
            self.accountant.set_kv_stats(rid, kv_stats(lay))

    def _reorder(self, rid: str, end: int, dest: tuple[int, ...], fresh: list) -> None:
        """The request's blocks [0, end) become ``dest`` (of them, or ``fresh``) then null blocks; the
        others among them go back to the pool."""
        manager = self.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        blocks = manager.req_to_blocks[rid]
        held = [b for b in blocks[:end] if not b.is_null]
        by_id = {b.block_id: b for b in [*held, *fresh]}
        kept = [by_id[i] for i in dest]
        gone = [b for b in held if b not in kept]
        blocks[:end] = kept + [manager._null_block] * (end - len(kept))
        manager.block_pool.free_blocks(reversed(gone))
        manager.num_cached_block[rid] = NULL_CACHED
