"""KV dropping, the scheduler's side: where each request's drop goes, and which blocks go back to the pool.

When a request's last prefill chunk is scheduled, the planner fixes its
:class:`~flopwise.techniques.kv_drop.Layout` (blocks it shares with another request stay protected), takes
the blocks about to be rewritten out of the prefix cache and attaches a
:class:`~flopwise_vllm.kv_drop.KVJob` to the scheduler output for the worker (:mod:`flopwise_vllm.kv_drop`
does the compaction). After that step it frees the emptied blocks; under a token budget it evicts the
oldest full tail block whenever the kept KV is a block over the budget. The accountant asks it how much
context a request's attention no longer reads (:meth:`KVPlanner.context_cut`), and the budget gate what
scoring the next step will charge (:meth:`KVPlanner.pending_scoring`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm.v1.request import Request

from flopwise.ledger import Breakdown, FlopModel
from flopwise.techniques import kv_drop as kd
from flopwise_vllm.accountant import Accountant
from flopwise_vllm.kv_drop import OUTPUT_ATTR, KVJob

logger = logging.getLogger("flopwise")


@dataclass
class KVState:
    """A request's KV dropping: its options, where its prefill started, the layout once dropped."""

    config: kd.KVDropConfig
    first: int | None = None  # tokens computed before its first prefill chunk (prefix-cache hits)
    layout: kd.Layout | None = None  # sent to the worker with the last prefill chunk
    applied: bool = False  # the step ran: later steps attend to the kept context only
    stashed: bool = False  # earlier prefill chunks were sent to the worker to keep
    evicted: int = 0  # tail blocks evicted while decoding (token budget)


def kv_stats(lay: kd.Layout) -> dict[str, int]:
    return {
        "prompt_tokens": lay.prompt,
        "kept_tokens": lay.kept_tokens,
        "dropped_tokens": lay.dropped_tokens,
        "dropped_blocks": lay.dropped_blocks,
    }


class KVPlanner:
    def __init__(self, scheduler, flop_model: FlopModel, accountant: Accountant, supported: bool):
        self.scheduler = scheduler  # its kv_cache_manager and block_size
        self.model = flop_model
        self.accountant = accountant
        self.supported = supported
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
            return
        self.states[request.request_id] = KVState(config)

    def forget(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    # -- what the accountant and the gate ask ------------------------------------------------------
    def context_cut(self, request: Request, start: int) -> int:
        """Context tokens a step of ``request`` from ``start`` no longer attends to."""
        kv = self.states.get(request.request_id)
        if kv is None or not kv.applied or start < kv.layout.prompt:
            return 0
        return kv.layout.dropped_tokens + kv.evicted * kv.layout.block_size

    def pending_scoring(self, request: Request) -> int:
        """Scoring FLOPs the request's next step may charge: a drop not made yet scores its whole prompt, as
        :meth:`_plan_one` charges it, unless its layout keeps nothing of the region or drops nothing (blocks
        shared with other requests only protect more, so this layout is the most the drop can score)."""
        kv = self.states.get(request.request_id)
        if kv is None or kv.layout is not None or kv.applied:
            return 0
        first = kv.first if kv.first is not None else request.num_computed_tokens
        bs = self.scheduler.block_size
        lay = kd.layout(kv.config, request.num_prompt_tokens, bs, -(-first // bs))
        if not (lay.active and lay.kept):
            return 0
        return self._scoring(kv, request.num_prompt_tokens - first).total

    def _scoring(self, kv: KVState, tokens: int) -> Breakdown:
        policy, scoring = kd.get_policy(kv.config.policy), Breakdown()
        for layer in self.model.spec.layers:
            scoring.add("kv_scoring", policy.scoring_flops(tokens, layer.q_heads, layer.head_dim))
        return scoring

    # -- each step ---------------------------------------------------------------------------------
    def plan(self, out, requests: dict[str, Request]) -> None:
        """Attach this step's KV jobs to the scheduler output (see :mod:`flopwise_vllm.kv_drop`)."""
        if not self.states:
            return
        for rid in out.preempted_req_ids or ():
            if rid in self.states:  # its blocks are gone; it prefills (and drops) again
                self.states[rid] = KVState(self.states[rid].config)
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
        if start >= prompt:  # decoding: evict under a token budget
            if kv.applied and kv.config.tokens is not None:
                self._evict(request, kv, start, jobs)
            return
        if kv.first is None:
            kv.first = start
        protected = -(-kv.first // block_size)  # a partly hit block is not ours to rewrite
        if request.num_computed_tokens < prompt:  # an earlier chunk: the worker stashes it
            if kd.layout(kv.config, prompt, block_size, protected).active:
                jobs[rid] = KVJob(kv.config.policy, kv.first, prompt)
                kv.stashed = True
            return
        manager = self.scheduler.kv_cache_manager
        blocks = manager.coordinator.single_type_managers[0].req_to_blocks[rid]
        for i in range(protected, min(prompt // block_size, len(blocks))):
            if blocks[i].ref_cnt > 1:  # shared with another request: never dropped under it
                protected = i + 1
        lay = kd.layout(kv.config, prompt, block_size, protected)
        if not lay.active:
            if kv.stashed:  # nothing to drop after all (shared blocks): the worker lets its stash go
                jobs[rid] = KVJob(kv.config.policy, kv.first, prompt, lay)
            if kv.config.tokens is not None:  # the budget still holds while generating
                kv.layout, kv.applied = lay, True
            return
        # The region's blocks leave the prefix cache: the kept ones are about to be rewritten, and the
        # dropped ones, freed after this step, could never be hit past them (hits are prefix chains).
        # Unhashed, freed blocks are the first the pool hands out again.
        for block in blocks[lay.protected : lay.full]:
            manager.block_pool._maybe_evict_cached_block(block)
        kv.layout = lay
        jobs[rid] = KVJob(kv.config.policy, kv.first, prompt, lay)
        if lay.kept:  # the whole region going is not scored
            self.accountant.charge_prompt_extra(
                request, "kv_scoring", self._scoring(kv, prompt - kv.first).total
            )

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
        jobs[rid] = KVJob(kv.config.policy, kv.first, lay.prompt, lay, kv.evicted)
        self.accountant.set_kv_stats(rid, {**kv_stats(lay), "evicted_tokens": kv.evicted * lay.block_size})

    def apply(self, scheduler_output) -> None:
        """After the step that dropped: the region's emptied blocks go back to the pool."""
        for rid, job in (getattr(scheduler_output, OUTPUT_ATTR, None) or {}).items():
            kv, lay = self.states.get(rid), job.layout
            if kv is None or lay is None or not lay.active or kv.layout is not lay or kv.applied:
                continue  # (an eviction update is applied when planned)
            for manager in self.scheduler.kv_cache_manager.coordinator.single_type_managers:
                manager._remove_blocks_in_range(rid, lay.protected + lay.kept, lay.full)
            kv.applied = True
            self.accountant.set_kv_stats(rid, kv_stats(lay))
