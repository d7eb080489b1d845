"""What the KV planner (scheduler) tells the KV worker each step, and what the worker keeps between steps.

The scheduler attaches ``{request id: KVJob}`` to ``SchedulerOutput.flopwise_kv``
(:mod:`flopwise_vllm.kv_planner`); the worker (:mod:`flopwise_vllm.kv_drop`) reads it at the start of the
step. A job's ``dest`` / ``resume`` say what the request reads while decoding: its blocks [``dest``, its
block list from ``resume`` on]. A ``rescore`` changes that after this step's attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from flopwise.techniques import kv_drop as kd

OUTPUT_ATTR = "flopwise_kv"  # SchedulerOutput attribute carrying {request id: KVJob}


@dataclass(frozen=True)
class Rescore:
    """A decode-time re-scoring (:class:`flopwise.techniques.kv_drop.Compaction`) in this step."""

    sources: tuple[int, ...]  # the blocks holding the rows, in order: kept, then the tail from ``resume``
    compaction: kd.Compaction
    dest: tuple[int, ...]  # where the kept rows go: the first ``new_kept`` of ``sources``


@dataclass(frozen=True)
class KVJob:
    """One request's KV work in a step: a prefill chunk to stash (``stash``), the drop (``layout``, on the
    last chunk), an eviction (new ``resume``) or a re-scoring (``rescore``) while decoding."""

    policy: str
    first: int  # the first position this request computes (after its prefix-cache hits)
    prompt: int
    layout: kd.Layout | None = None
    dest: tuple[int, ...] = ()  # the blocks holding the kept (compacted) tokens, in order
    resume: int = 0  # the request's blocks from this index on are read as they are
    window: int = 0  # recent queries the worker keeps for the request's re-scorings
    stash: bool = False  # an earlier prefill chunk the last one needs
    rescore: Rescore | None = None

    @property
    def reads(self) -> bool:
        """Does the request attend to less than its whole context from here on?"""
        return self.resume > len(self.dest)

    def after(self) -> KVJob:
        """What the request reads from the next step on."""
        if self.rescore is None:
            return self
        r = self.rescore
        return replace(self, dest=r.dest, resume=r.compaction.new_resume, rescore=None, layout=None)


@dataclass
class Task:
    request_id: str
    q0: int  # the row's tokens in this step's batch
    q1: int
    job: KVJob
    blocks: torch.Tensor | None  # the row's block ids (the last chunk only)


class QueryRing:
    """The last ``size`` queries of one request in one layer, written in place: a decode step copies one
    row (a copy of the whole window per step and layer cost a third of the decode speed at 16 requests)."""

    def __init__(self, size: int, like: torch.Tensor):
        self.buf = like.new_empty((size, *like.shape[1:]))
        self.size, self.next, self.filled = size, 0, 0

    def push(self, queries: torch.Tensor) -> None:
        n = queries.shape[0]
        if n >= self.size:
            self.buf.copy_(queries[-self.size :])
            self.next, self.filled = 0, self.size
            return
        first = min(n, self.size - self.next)
        self.buf[self.next : self.next + first] = queries[:first]
        if n > first:  # wraps around
            self.buf[: n - first] = queries[first:]
        self.next, self.filled = (self.next + n) % self.size, min(self.size, self.filled + n)

    def last(self, w: int) -> torch.Tensor:
        """The newest ``w`` queries, oldest first."""
        if self.filled < self.size:
            return self.buf[: self.filled][-w:]
        return torch.cat([self.buf[self.next :], self.buf[: self.next]])[-w:]


@dataclass
class WorkerState:
    """Per worker process: the runner (for row order), this step's jobs, the compacted requests, the recent
    queries of requests that re-score."""

    runner: object | None = None
    jobs: dict[str, KVJob] = field(default_factory=dict)
    views: dict[str, KVJob] = field(default_factory=dict)  # requests reading fewer blocks than they hold
    stash: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = field(
        default_factory=dict
    )
    windows: dict[str, int] = field(default_factory=dict)  # request -> queries kept
    recent: dict[tuple[str, int], QueryRing] = field(default_factory=dict)  # (request, layer) -> its queries

    def begin_step(self, scheduler_output) -> None:
        gone = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
        for rid in gone:
            self.views.pop(rid, None)
            self.windows.pop(rid, None)
        if gone and (self.stash or self.recent):
            self.stash = {k: v for k, v in self.stash.items() if k[0] not in gone}
            self.recent = {k: v for k, v in self.recent.items() if k[0] not in gone}
        self.jobs = getattr(scheduler_output, OUTPUT_ATTR, None) or {}
        for rid, job in self.jobs.items():
            if job.window:
                self.windows[rid] = job.window
            self.views.pop(rid, None)  # a (re-)prefill lays out anew; an eviction replaces the view
            if job.reads:
                # Read by the builder only for rows past the prompt (a drop's: from the next step on).
                self.views[rid] = job

    def end_step(self) -> None:
        """A re-scoring made in this step is read from the next one on."""
        for rid, job in self.jobs.items():
            if job.rescore is not None:  # (also the first one of a request that read everything so far)
                self.views[rid] = job.after()

    def keep_queries(self, rid: str, layer: int, queries: torch.Tensor) -> None:
        ring = self.recent.get((rid, layer))
        if ring is None:
            ring = self.recent[(rid, layer)] = QueryRing(self.windows[rid], queries)
        ring.push(queries)


STATE = WorkerState()
