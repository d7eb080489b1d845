"""Early rejection inside the engine: the scheduler side of :mod:`flopwise.techniques.early_rejection`.

The candidates of an n>1 request are vLLM's own children (``{index}_{parent}``), generated together in
one batch. The scheduler holds each child that has reached the next checkpoint (leaves it out of the
step, its KV blocks kept) until every live sibling has; then the PRM scores the partial answers and the
weak children are finished on the spot (finish_reason ``abort``, stop_reason ``early_rejection``), their
KV blocks freed at once. Everything runs in the engine process, so decisions are exact and synchronous:
no candidate runs past a checkpoint while the PRM decides, and no work goes uncharged.

A PRM that fails (cannot load, raises) turns rejection off for that request; it is served in full and the
stats say why. PRM FLOPs are charged to the group (and its budget); a scoring pass that would cross the
budget is skipped rather than run.

The ``confidence`` scorers (:mod:`flopwise.prm.confidence`) need no PRM: the scheduler asks vLLM's sampler
for each candidate's top-k log-probabilities (``SamplingParams.logprobs`` on the engine's copy of the
request), folds each new token's into the candidate's confidences in :meth:`RejectionController.observe`
and takes them out of the output again unless the client asked for logprobs itself. Each scored token is
charged (``prm``) as it arrives, and the budget gate bounds a step with that cost
(:meth:`RejectionController.pending_scoring`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from vllm.v1.request import Request, RequestStatus

from flopwise.prm import ProcessRewardModel, confidence, is_confidence, load_prm
from flopwise.techniques import early_rejection as er
from flopwise_vllm.accountant import Accountant, Group, group_of, index_of

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
    error: str | None = None
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> latest score
    rejected: dict[int, int] = field(default_factory=dict)  # candidate index -> checkpoint that rejected it
    lengths: dict[int, int] = field(default_factory=dict)  # candidate index -> tokens generated when it ended
    cut: float | None = None  # the percentile rule's cut, set by the first checkpoint
    # candidate index -> its tokens' confidences (confidence scorers only)
    confidences: dict[int, list[float]] = field(default_factory=dict)
    _prm: ProcessRewardModel | None = None

    @property
    def by_confidence(self) -> bool:
        return is_confidence(self.config.prm)

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
        # request id -> the logprobs its client asked for, for requests whose confidence is read
        self.client_logprobs: dict[str, int | None] = {}
        self._closed: list[str] = []  # ... of which these finished this step (their last output is stripped)
        self._tokenizer = None
        self._newlines: frozenset[int] | None = None
        self._vocab = accountant.model.spec.vocab

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
        if rej.by_confidence:
            self._ask_logprobs(request, config.confidence_top_k)

    def _ask_logprobs(self, request: Request, k: int) -> None:
        """Make the sampler return ``k`` top logprobs for ``request`` (on the engine's own copy of its
        sampling parameters: the client's object may be shared with other requests)."""
        params = request.sampling_params
        asked = params.logprobs
        self.client_logprobs[request.request_id] = asked
        if asked is None or (0 <= asked < k):
            request.sampling_params = copy.copy(params)
            request.sampling_params.logprobs = k

    def pending_scoring(self, request: Request) -> int:
        """FLOPs the next step's confidence scoring of ``request`` will charge (for the budget gate)."""
        rej = self.groups.get(group_of(request.request_id))
        if rej is None or not rej.active or not rej.by_confidence:
            return 0
        return confidence.flops_per_token(self._vocab, rej.config.confidence_top_k)

    def observe(self, model_runner_output) -> None:
        """Fold the new tokens' top-k logprobs into their candidates' confidences (and charge them)."""
        logprobs = getattr(model_runner_output, "logprobs", None)
        if not self.client_logprobs or logprobs is None:
            return
        for rid in self.client_logprobs:
            row = model_runner_output.req_id_to_index.get(rid)
            rej = self.groups.get(group_of(rid))
            if row is None or rej is None or not rej.active:
                continue
            count = len(model_runner_output.sampled_token_ids[row])
            if not count:
                continue
            k = rej.config.confidence_top_k
            rows = logprobs.slice_request(row, count).logprobs
            confs = rej.confidences.setdefault(index_of(rid), [])
            # column 0 is the sampled token's, then the top ones in order
            confs += [confidence.token_confidence([float(x) for x in r[1 : k + 1]]) for r in rows]
            cost = count * confidence.flops_per_token(self._vocab, k)
            rej.prm_flops += cost
            self.accountant.charge_group_extra(rej.group, "prm", cost)

    def strip(self, outputs) -> None:
        """Give each client the logprobs it asked for, not the ones the confidence scorer needed."""
        if not self.client_logprobs:
            return
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                if out.request_id not in self.client_logprobs or out.new_logprobs is None:
                    continue
                asked = self.client_logprobs[out.request_id]
                if asked is None:
                    out.new_logprobs = None
                elif 0 <= asked < out.new_logprobs.logprobs.shape[1] - 1:
                    lp = out.new_logprobs
                    out.new_logprobs = type(lp)(
                        lp.logprob_token_ids[:, : asked + 1],
                        lp.logprobs[:, : asked + 1],
                        lp.sampled_token_ranks,
                    )
        for rid in self._closed:
            self.client_logprobs.pop(rid, None)
        self._closed.clear()

    def _text(self, token_ids, special: bool) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=not special)

    def _score(self, rej: Rejection, requests: list[Request], final: bool) -> list[float] | None:
        """PRM scores of ``requests``' answers so far, charged to the group; None if it cannot run."""
        if rej.by_confidence:
            mode = confidence.NAMES[rej.config.prm]
            scores = [
                confidence.score(
                    rej.confidences.get(index_of(r.request_id), []), rej.config.confidence_window, mode
                )
                for r in requests
            ]
            for r, s in zip(requests, scores):
                rej.scores[index_of(r.request_id)] = s
            return scores
        budget = rej.group.budget
        try:
            prm = rej.prm()
            texts = [
                (self._text(r.prompt_token_ids, True), self._text(r.output_token_ids, False))
                for r in requests
            ]
            cost = sum(prm.cost(p, a, final) for p, a in texts)
            if budget is not None and budget.charged + cost > budget.budget:
                rej.fail("skipped", f"scoring would cross the flop_budget ({cost:,} PRM FLOPs)")
                return None
            scores = [prm.score(p, a, final=final)[0] for p, a in texts]
        except Exception as e:  # any PRM failure: serve the request without rejection, and say so
            rej.fail("PRM failed", f"{type(e).__name__}: {e}")
            return None
        rej.prm_flops += cost
        self.accountant.charge_group_extra(rej.group, "prm", cost)
        for r, s in zip(requests, scores):
            rej.scores[index_of(r.request_id)] = s
        return scores

    def _reached(self, rej: Rejection, request: Request) -> bool:
        steps = 0
        if rej.config.every_steps is not None:
            if self._newlines is None:
                self._text((), False)  # loads the tokenizer
                self._newlines = er.newline_ids(self._tokenizer)
            steps = sum(t in self._newlines for t in request.output_token_ids)
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
        if request.request_id in self.client_logprobs:
            self._closed.append(request.request_id)
        rej = self.groups.get(group_of(request.request_id))
        if rej is None:
            return
        i = index_of(request.request_id)
        rej.lengths[i] = request.num_output_tokens
        natural = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if natural and i not in rej.rejected and rej.error is None:
            self._score(rej, [request], final=True)
        if group.live <= 1:  # the last one: the group is settled next
            del self.groups[group_of(request.request_id)]
