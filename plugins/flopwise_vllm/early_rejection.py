"""Early rejection inside the engine: the scheduler side of :mod:`flopwise.techniques.early_rejection`.

The candidates of an n>1 request are vLLM's own children (``{index}_{parent}``), generated together in
one batch. The scheduler holds each child that has reached the next checkpoint (leaves it out of the
step, its KV blocks kept) until every live sibling has; then the PRM scores the partial answers and the
weak children are finished on the spot (finish_reason ``abort``, stop_reason ``early_rejection``), their
KV blocks freed at once. Everything runs in the engine process, so decisions are exact and synchronous:
no candidate runs past a checkpoint while the PRM decides, and no work goes uncharged.

A text PRM keeps each candidate's KV cache between its checkpoints (keyed by request id, released when the
candidate ends), so a checkpoint reads only the text written since the last one and is charged for that.
It runs inside ``schedule()``: the whole engine waits for it, and the stats say how long (``prm_s``).

A PRM that fails (cannot load, raises) turns rejection off for that request; it is served in full and the
stats say why. PRM FLOPs are charged to the group (and its budget); a scoring pass that would cross the
budget is skipped rather than run.

The scorers the engine computes as it generates (``confidence``, ``self:<head>``) live in
:mod:`flopwise_vllm.engine_scores`: charged per token as it arrives, bounded by the budget gate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from vllm.v1.request import Request, RequestStatus

from flopwise.prm import ProcessRewardModel, is_confidence, load_prm, self_head
from flopwise.techniques import early_rejection as er
from flopwise_vllm.accountant import Accountant, Group, group_of, index_of
from flopwise_vllm.engine_scores import EngineScores

logger = logging.getLogger("flopwise")


@dataclass
class Rejection:
    """Early-rejection state of one group (one client request's n candidates)."""

    config: er.EarlyRejectionConfig
    group: Group
    next_checkpoint: int = 1  # 1-based index of the checkpoint the candidates are heading for
    active: bool = True
    started: int = 0
    checkpoints: int = 0
    prm_flops: int = 0
    prm_seconds: float = 0.0  # spent in a text PRM inside schedule(), while the whole engine waits
    error: str | None = None
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> latest score
    rejected: dict[int, int] = field(default_factory=dict)  # candidate index -> checkpoint that rejected it
    lengths: dict[int, int] = field(default_factory=dict)  # candidate index -> tokens generated when it ended
    cut: float | None = None  # the percentile rule's cut, set by the first checkpoint
    # candidate index -> its tokens' confidences (confidence scorers only)
    confidences: dict[int, list[float]] = field(default_factory=dict)
    # candidate index -> a self head's logits (self scorers only)
    step_values: dict[int, self_head.StepValues] = field(default_factory=dict)
    _prm: ProcessRewardModel | None = None

    @property
    def by_confidence(self) -> bool:
        return is_confidence(self.config.prm)

    @property
    def by_self(self) -> bool:
        return self_head.is_self(self.config.prm)

    def prm(self) -> ProcessRewardModel:
        if self._prm is None:
            self._prm = load_prm(self.config.prm)
        return self._prm

    def fail(self, what: str, error: Exception | str) -> None:
        self.active = False
        self.error = f"{what}: {error}"
        logger.warning("flopwise early rejection off for one request: %s", self.error)

    def stats(self) -> dict:
        finished = [n for i, n in self.lengths.items() if i not in self.rejected]
        mean = sum(finished) / len(finished) if finished else 0.0
        saved = sum(max(0.0, mean - self.lengths.get(i, 0)) for i in self.rejected)
        out = {
            "prm": self.config.prm,
            "started": self.started,
            "rejected": len(self.rejected),
            "checkpoints": self.checkpoints,
            "tokens_saved": round(saved),
            "prm_flops": self.prm_flops,
            "prm_s": round(self.prm_seconds, 4),
            "scores": {str(i): s for i, s in sorted(self.scores.items())},
            "rejected_at": {str(i): c for i, c in sorted(self.rejected.items())},
        }
        if self.cut is not None:
            out["cut"] = self.cut
        if self.error:
            out["error"] = self.error
        return out


class RejectionController:
    """Holds, scores and rejects the candidates of groups with early rejection (one per scheduler)."""

    def __init__(self, accountant: Accountant, tokenizer_name: str):
        self.accountant = accountant
        self.tokenizer_name = tokenizer_name
        self.groups: dict[str, Rejection] = {}  # group id -> its state, while the group lives
        self._tokenizer = None
        self._newlines: frozenset[int] | None = None
        self.engine_scores = EngineScores(accountant, self.newlines)

    def open(self, request: Request, group: Group, config: er.EarlyRejectionConfig | None) -> None:
        if config is None:
            return
        g = group_of(request.request_id)
        rej = self.groups.get(g)
        if rej is None:
            rej = self.groups[g] = Rejection(config, group)
            group.reports[er.FIELD] = rej.stats
            # usage.flops.prm is there even when the PRM costs nothing
            group.settled.extra.setdefault("prm", 0)
        rej.started += 1
        self.engine_scores.open(request, rej)

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

    def _reached(self, rej: Rejection, request: Request) -> bool:
        steps = 0
        if rej.config.every_steps is not None:
            newlines = self.newlines()
            steps = sum(t in newlines for t in request.output_token_ids)
        return rej.config.reached(rej.next_checkpoint, request.num_output_tokens, steps)

    def checkpoints(self, requests: dict[str, Request]) -> tuple[list[Request], list[Request]]:
        """Score and reject where every live candidate reached its group's checkpoint; -> (the requests to
        hold out of this step, the requests to reject now)."""
        held: list[Request] = []
        rejected: list[Request] = []
        for rej in [r for r in self.groups.values() if r.active]:
            live = sorted(
                (requests[rid] for rid in rej.group.members if not requests[rid].is_finished()),
                key=lambda r: index_of(r.request_id),
            )
            if not rej.config.rejects_at(len(live)):
                # Nothing to reject among this many; re-checked each step because siblings may still be
                # arriving (vLLM adds the children one by one).
                continue
            reached = [r for r in live if self._reached(rej, r)]
            if len(reached) < len(live):
                # a preempted one waits anyway
                held += [r for r in reached if r.status == RequestStatus.RUNNING]
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

    def close(self, request: Request, group: Group, status: RequestStatus) -> None:
        """Record a candidate's length; a candidate that finished on its own gets its final PRM score."""
        self.engine_scores.close(request.request_id)
        rej = self.groups.get(group_of(request.request_id))
        if rej is None:
            return
        i = index_of(request.request_id)
        rej.lengths[i] = request.num_output_tokens
        natural = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if natural and i not in rej.rejected and rej.error is None:
            self._score(rej, [request], final=True)
        if rej._prm is not None:
            rej._prm.release(request.request_id)
        if group.live <= 1:  # the last one: the group is settled next
            del self.groups[group_of(request.request_id)]
