"""Early rejection inside the engine: the scheduler side of :mod:`flopwise.techniques.early_rejection`.

The candidates of an n>1 request are vLLM's own children (``{index}_{parent}``), generated together in
one batch. The scheduler holds each child that has reached the next checkpoint (leaves it out of the
step, its KV blocks kept) until every live sibling has; then the PRM scores the partial answers and the
weak children are finished on the spot (finish_reason ``abort``, stop_reason ``early_rejection``), their
KV blocks freed at once. Everything runs in the engine process, so decisions are exact and synchronous:
no candidate runs past a checkpoint while the PRM decides, and no work goes uncharged. A step that can
schedule nothing while children are held preempts them (the scheduler): they wait at the checkpoint, out of
the waiting queue (:attr:`RejectionController.withheld`), and are recomputed once their siblings reach it.

A text PRM keeps each candidate's KV cache between its checkpoints (keyed by request id, released when the
candidate ends), so a checkpoint reads only the text written since the last one and is charged for that.
It runs inside ``schedule()``: the whole engine waits for it, and the stats say how long (``prm_s``).

vLLM's front end adds the n children one by one, and the engine may step in between; so the children
are parked (left in the waiting queue but out of each step, holding no KV blocks) until all n have
arrived (the front end writes n into the options), then start together: a seeded request then does the
same thing every time.
With ``width``, children past the width stay parked and start one by one as live siblings end; each
child is then scored at its own checkpoints and never held.
``accept`` ends the group when a child finishes with a high enough final score: the live and parked
siblings are finished at the next step.

A PRM that fails (cannot load, raises) turns rejection off for that request; it is served in full and the
stats say why. PRM FLOPs are charged to the group (and its budget); a scoring pass that would cross the
budget is skipped rather than run.

The scorers the engine computes as it generates (``confidence``, ``self:<head>``) live in
:mod:`flopwise_vllm.engine_scores`: charged per token as it arrives, bounded by the budget gate.
"""

from __future__ import annotations

import logging
import time

from vllm.v1.request import Request, RequestStatus

from flopwise.techniques import early_rejection as er
from flopwise_vllm.accountant import Accountant, Group, group_of, index_of
from flopwise_vllm.engine_scores import EngineScores
from flopwise_vllm.rejection_state import Rejection

logger = logging.getLogger("flopwise")
# How long a request's first children wait for the rest: vLLM adds them within one burst of messages, but
# an engine among several (data parallel, no flopwise front end to pin them) may never see them all.
ARRIVAL_S = 1.0


class RejectionController:
    """Holds, scores and rejects the candidates of groups with early rejection (one per scheduler)."""

    def __init__(self, accountant: Accountant, tokenizer_name: str):
        self.accountant = accountant
        self.tokenizer_name = tokenizer_name
        self.groups: dict[str, Rejection] = {}  # group id -> its state, while the group lives
        self._tokenizer = None
        self._newlines: frozenset[int] | None = None
        self.engine_scores = EngineScores(accountant, self.newlines)
        self.withheld: list[Request] = []  # this step: preempted candidates already at their checkpoint

    def open(
        self, request: Request, group: Group, config: er.EarlyRejectionConfig | None, size: int | None
    ) -> None:
        """Track a new child of a request with ``size`` children (parked until all have come)."""
        if config is None:
            return
        g = group_of(request.request_id)
        rej = self.groups.get(g)
        if rej is None:
            rej = self.groups[g] = Rejection(config, group, size=size)
            group.reports[er.FIELD] = rej.stats
            # usage.flops.prm is there even when the PRM costs nothing
            group.settled.extra.setdefault("prm", 0)
        rej.started += 1
        self.engine_scores.open(request, rej)
        if size is None and (config.width is None or index_of(request.request_id) < config.width):
            return  # n unknown (an engine used without flopwise's front end): start as they come
        rej.parked.append(request)
        rej.parked.sort(key=lambda r: index_of(r.request_id))  # vLLM adds the children in any order

    def parked(self) -> list[Request]:
        """Children not started yet (siblings still arriving, or no free width) and preempted ones at their
        checkpoint (a recompute would sample past it): out of this step's waiting queue."""
        parked = [r for rej in self.groups.values() for r in rej.parked if not r.is_finished()]
        return parked + self.withheld

    def pending_scoring(self, request: Request) -> int:
        """FLOPs the next step's in-engine scoring of ``request`` will charge (for the budget gate)."""
        rej = self.groups.get(group_of(request.request_id))
        return 0 if rej is None else self.engine_scores.per_token(rej)

    def plan(self, scheduler_output) -> None:
        """Tell the worker this step's self-head candidates."""
        self.engine_scores.plan(scheduler_output, self.groups)

    def observe(self, model_runner_output) -> None:
        """Fold the new tokens' in-engine scores into their candidates (and charge them)."""
        self.engine_scores.observe(model_runner_output, self.groups)

    def strip(self, outputs) -> None:
        """Give each client the logprobs it asked for, not the ones the confidence scorer needed."""
        self.engine_scores.strip(outputs)

    def newlines(self) -> frozenset[int]:
        """Token ids that end a step (loads the tokenizer once)."""
        if self._newlines is None:
            self._text((), False)
            self._newlines = er.newline_ids(self._tokenizer)
        return self._newlines

    def _text(self, token_ids, special: bool) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=not special)

    def _score(self, rej: Rejection, requests: list[Request], final: bool) -> list[float] | None:
        """PRM scores of ``requests``' answers so far, charged to the group; None if it cannot run."""
        if rej.by_confidence or rej.by_self:
            scores = [self.engine_scores.score(rej, r, final) for r in requests]
            for r, s in zip(requests, scores):
                rej.scores[index_of(r.request_id)] = s
            return scores
        budget = rej.group.budget
        t0 = time.perf_counter()
        try:
            prm = rej.prm()
            texts = [
                (r.request_id, self._text(r.prompt_token_ids, True), self._text(r.output_token_ids, False))
                for r in requests
            ]
            cost = sum(prm.cost(p, a, final, key) for key, p, a in texts)
            if budget is not None and budget.charged + cost > budget.budget:
                rej.fail("skipped", f"scoring would cross the flop_budget ({cost:,} PRM FLOPs)")
                return None
            # keyed by candidate: the PRM reads only what each wrote since its last checkpoint
            results = [prm.score(p, a, final=final, key=key) for key, p, a in texts]
        except Exception as e:  # any PRM failure: serve the request without rejection, and say so
            rej.fail("PRM failed", f"{type(e).__name__}: {e}")
            return None
        finally:
            # the scheduler waits for the PRM: every request in the engine stalls this long
            rej.prm_seconds += time.perf_counter() - t0
        scores, spent = [s for s, _ in results], sum(f for _, f in results)
        rej.prm_flops += spent
        self.accountant.charge_group_extra(rej.group, "prm", spent)
        for r, s in zip(requests, scores):
            rej.scores[index_of(r.request_id)] = s
        return scores

    def _reached(self, rej: Rejection, request: Request, checkpoint: int | None = None) -> bool:
        steps = 0
        if rej.config.every_steps is not None:
            steps = rej.steps(index_of(request.request_id), request.output_token_ids, self.newlines())
        checkpoint = rej.next_checkpoint if checkpoint is None else checkpoint
        return rej.config.reached(checkpoint, request.num_output_tokens, steps)

    def checkpoints(self, requests: dict[str, Request]) -> tuple[list[Request], list[Request]]:
        """Score and reject where every live candidate reached its group's checkpoint (with ``width``: where
        each one reached its own), and start parked children where they may; -> (the requests to hold out of
        this step, the requests to finish now)."""
        held: list[Request] = []
        rejected: list[Request] = []
        self.withheld = []
        for rej in self.groups.values():
            parked = {r.request_id for r in rej.parked}
            live = sorted(
                (
                    requests[rid]
                    for rid in rej.group.members
                    if not requests[rid].is_finished() and rid not in parked
                ),
                key=lambda r: index_of(r.request_id),
            )
            if rej.accepted is not None:  # the answer is in: the rest stop, the parked never start
                rest = live + [r for r in rej.parked if not r.is_finished()]
                for r in rest:
                    rej.rejected[index_of(r.request_id)] = self._passed(rej, r)
                rejected += rest
                rej.parked.clear()
                continue
            if rej.config.independent:
                self._own_checkpoints(rej, live, rejected)
                live = [r for r in live if index_of(r.request_id) not in rej.rejected]
            self._start(rej, live)
            if rej.config.independent:
                continue
            if not rej.active or not rej.config.rejects_at(len(live)):
                # Nothing to reject among this many; re-checked each step because siblings may still be
                # arriving (vLLM adds the children one by one).
                continue
            reached = [r for r in live if self._reached(rej, r)]
            if len(reached) < len(live):
                held += [r for r in reached if r.status == RequestStatus.RUNNING]
                self.withheld += [r for r in reached if r.status != RequestStatus.RUNNING]
                continue
            scores = self._score(rej, live, final=False)
            if scores is None:
                continue
            rej.checkpoints += 1
            rej.next_checkpoint += 1
            if rej.checkpoints == 1:
                rej.cut = rej.config.warmup_cut(scores)
            kept = {live[i].request_id for i in rej.config.kept(scores, rej.cut)}
            for r in live:
                if r.request_id not in kept:
                    rej.rejected[index_of(r.request_id)] = rej.checkpoints
                    rejected.append(r)
        return held, rejected

    def _passed(self, rej: Rejection, request: Request) -> int:
        """Checkpoints ``request`` has passed (its group's, in lock-step)."""
        if rej.config.independent:
            return rej.own.get(index_of(request.request_id), 1) - 1
        return rej.checkpoints

    @staticmethod
    def _start(rej: Rejection, live: list[Request]) -> None:
        """Unpark children: none while siblings are still arriving, then up to the width."""
        parked = [r for r in rej.parked if not r.is_finished()]  # a client abort finishes parked ones
        if rej.size is not None and rej.started < rej.size and time.monotonic() < rej.opened + ARRIVAL_S:
            rej.parked = parked  # siblings still on their way (the wait is bounded: some may go elsewhere)
            return
        free = max(0, (rej.config.width or rej.size or len(parked)) - len(live))
        rej.parked = parked[free:]

    def _own_checkpoints(self, rej: Rejection, live: list[Request], rejected: list[Request]) -> None:
        """``width``: score each live candidate at its own checkpoint and reject below ``threshold`` (in
        index order, sparing ``min_keep``)."""
        reached = []
        for r in live:
            i = index_of(r.request_id)
            rej.own.setdefault(i, 1)
            if rej.active and self._reached(rej, r, rej.own[i]):
                reached.append(r)
        scores = self._score(rej, reached, final=False) if reached else None
        for r, score in zip(reached, scores or []):
            i = index_of(r.request_id)
            rej.own[i] += 1
            rej.checkpoints += 1
            # live, parked and finished on their own (members: not closed yet; parked among them)
            remaining = len(rej.finished) + sum(index_of(m) not in rej.rejected for m in rej.group.members)
            if rej.config.rejects_one(score, remaining):
                rej.rejected[i] = rej.own[i] - 1
                rejected.append(r)

    def close(self, request: Request, group: Group, status: RequestStatus) -> None:
        """Record a candidate's length; a candidate that finished on its own gets its final PRM score."""
        self.engine_scores.close(request.request_id)
        rej = self.groups.get(group_of(request.request_id))
        if rej is None:
            return
        i = index_of(request.request_id)
        rej.lengths[i] = request.num_output_tokens
        natural = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if natural and i not in rej.rejected:
            rej.finished.add(i)
            if rej.error is None:
                scores = self._score(rej, [request], final=True)
                if rej.accepted is None and scores and rej.config.accepts(scores[0]):
                    rej.accepted = i
        if rej._prm is not None:
            rej._prm.release(request.request_id)
        if group.live <= 1:  # the last one: the group is settled next
            del self.groups[group_of(request.request_id)]
