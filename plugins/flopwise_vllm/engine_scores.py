"""The early-rejection scorers the engine computes as it generates: no PRM reads the text.

* ``confidence`` / ``confidence:tail`` (:mod:`flopwise.prm.confidence`): the scheduler asks vLLM's sampler
  for each candidate's top-k log-probabilities (``SamplingParams.logprobs`` on the engine's copy of the
  request), folds each new token's into the candidate's confidences in :meth:`EngineScores.observe` and
  takes them out of the output again unless the client asked for logprobs itself
  (:meth:`EngineScores.strip`).
* ``self:<head>`` (:mod:`flopwise.prm.self_head`): the scheduler names each scheduled candidate's head on
  the step's ``SchedulerOutput``; flopwise's worker returns the head's value at the row the candidate
  sampled from (:mod:`flopwise_vllm.self_values`), kept here where a step ends (a newline token).

Each scored token is charged (``prm``) as it arrives, and the budget gate bounds a step with that cost
(:meth:`EngineScores.pending`). A value that does not arrive (no flopwise worker) turns rejection off for
the request, as any scorer failure does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from vllm.v1.request import Request

from flopwise.prm import confidence, self_head
from flopwise_vllm.accountant import Accountant, group_of, index_of
from flopwise_vllm.self_values import SCHEDULED_ATTR, VALUES_ATTR


class EngineScores:
    """Per scheduler: the requests whose scores come from the engine, and their scores as they arrive."""

    def __init__(self, accountant: Accountant, newlines: Callable[[], frozenset[int]]):
        self.accountant = accountant
        self._newlines = newlines
        spec = accountant.model.spec
        self._vocab, self._architecture, self._hidden = spec.vocab, spec.architecture, spec.hidden
        # request id -> the logprobs its client asked for, for requests whose confidence is read
        self.client_logprobs: dict[str, int | None] = {}
        self._closed: list[str] = []  # ... of which these finished this step (their last output is stripped)
        self.heads: dict[str, str] = {}  # request id -> its self head, while it lives

    def open(self, request: Request, rej) -> None:
        """Start scoring ``request`` (a candidate of ``rej``'s group) if its scorer is the engine's."""
        if rej.by_confidence:
            self._ask_logprobs(request, rej.config.confidence_top_k)
        elif rej.by_self and rej.active:
            try:
                self_head.check_fits(rej.config.prm, self._architecture, self._hidden)
                self_head.load(rej.config.prm)
            except Exception as e:  # the front end refuses these first; this guards other callers
                rej.fail("self head", f"{type(e).__name__}: {e}")
                return
            self.heads[request.request_id] = rej.config.prm

    def _ask_logprobs(self, request: Request, k: int) -> None:
        """Make the sampler return ``k`` top logprobs for ``request`` (on the engine's own copy of its
        sampling parameters: the client's object may be shared with other requests)."""
        params = request.sampling_params
        asked = params.logprobs
        self.client_logprobs[request.request_id] = asked
        if asked is None or (0 <= asked < k):
            request.sampling_params = copy.copy(params)
            request.sampling_params.logprobs = k

    def per_token(self, rej) -> int:
        """FLOPs one generated token's score costs in ``rej``'s group (0 for a PRM that reads text)."""
        if not rej.active:
            return 0
        if rej.by_confidence:
            return confidence.flops_per_token(self._vocab, rej.config.confidence_top_k)
        # the head's own cost formula (loaded once per process; check_fits made its hidden the model's)
        return self_head.load(rej.config.prm).flops_per_token if rej.by_self else 0

    def plan(self, scheduler_output, groups: dict) -> None:
        """Name this step's candidates with a self head for the worker."""
        if not self.heads:
            return
        scheduled = scheduler_output.num_scheduled_tokens
        heads = {
            rid: name
            for rid, name in self.heads.items()
            if rid in scheduled and getattr(groups.get(group_of(rid)), "active", False)
        }
        if heads:
            setattr(scheduler_output, SCHEDULED_ATTR, heads)

    def observe(self, model_runner_output, groups: dict) -> None:
        """Fold the new tokens' scores into their candidates (and charge them)."""
        if self.client_logprobs:
            self._observe_logprobs(model_runner_output, groups)
        if self.heads:
            self._observe_values(model_runner_output, groups)

    def _new_tokens(self, model_runner_output, rids, groups):
        for rid in rids:
            row = model_runner_output.req_id_to_index.get(rid)
            rej = groups.get(group_of(rid))
            if row is None or rej is None or not rej.active:
                continue
            tokens = model_runner_output.sampled_token_ids[row]
            if tokens:
                yield rid, row, rej, tokens

    def _charge(self, rej, cost: int) -> None:
        rej.prm_flops += cost
        self.accountant.charge_group_extra(rej.group, "prm", cost)

    def _observe_logprobs(self, model_runner_output, groups) -> None:
        logprobs = getattr(model_runner_output, "logprobs", None)
        if logprobs is None:
            return
        for rid, row, rej, tokens in self._new_tokens(model_runner_output, self.client_logprobs, groups):
            k = rej.config.confidence_top_k
            rows = logprobs.slice_request(row, len(tokens)).logprobs
            confs = rej.confidences.setdefault(index_of(rid), [])
            # column 0 is the sampled token's, then the top ones in order
            confs += [confidence.token_confidence([float(x) for x in r[1 : k + 1]]) for r in rows]
            self._charge(rej, len(tokens) * self.per_token(rej))

    def _observe_values(self, model_runner_output, groups) -> None:
        values = getattr(model_runner_output, VALUES_ATTR, None) or {}
        newlines = self._newlines()
        for rid, _, rej, tokens in self._new_tokens(model_runner_output, self.heads, groups):
            if rid not in values:
                rej.fail("self head", "the worker returned no value (is flopwise's CPU worker running?)")
                continue
            sv = rej.step_values.setdefault(index_of(rid), self_head.StepValues())
            sv.add(values[rid], ends_step=tokens[-1] in newlines)
            self._charge(rej, self.per_token(rej))

    def score(self, rej, request: Request, final: bool) -> float:
        """The candidate's score from what the engine computed for it."""
        i = index_of(request.request_id)
        if rej.by_confidence:
            mode = confidence.NAMES[rej.config.prm]
            return confidence.score(rej.confidences.get(i, []), rej.config.confidence_window, mode)
        return rej.step_values.get(i, self_head.StepValues()).score(final)

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

    def close(self, request_id: str) -> None:
        if request_id in self.client_logprobs:
            self._closed.append(request_id)
        self.heads.pop(request_id, None)
