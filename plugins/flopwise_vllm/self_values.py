"""``self:<head>`` scores in the worker: a value head on the hidden states the model runner already holds.

vLLM's runner keeps, between ``execute_model`` and ``sample_tokens``, the last hidden state of every row it
samples from (``ExecuteModelState.sample_hidden_states``, one row per request in the batch's order: what
the LM head reads). flopwise's CPU worker applies each request's head (:mod:`flopwise.prm.self_head`) to
its row before the sampler runs, and hands the scheduler ``{request id: head logit}`` on the step's
``ModelRunnerOutput`` (attribute :data:`VALUES_ATTR`). Which requests, and with which head, the scheduler
says on the ``SchedulerOutput`` (:data:`SCHEDULED_ATTR`). Rows whose sample the runner discards (a prompt
only partly prefilled) get no value, so each generated token costs exactly one dot product. Any
architecture works: nothing in the model changes.
"""

from __future__ import annotations

import logging

import numpy as np

from flopwise.prm import self_head

SCHEDULED_ATTR = "flopwise_self"  # SchedulerOutput attribute: {request id: "self:<head>"}
VALUES_ATTR = "flopwise_self_values"  # ModelRunnerOutput attribute: {request id: head logit}
logger = logging.getLogger("flopwise")


def head_values(runner, state, heads: dict[str, str]) -> dict[str, float]:
    """``{request id: logit}`` for the rows of ``heads``' requests that sample a token this step."""
    batch = runner.input_batch
    hidden = state.sample_hidden_states
    if hidden is None or hidden.shape[0] != batch.num_reqs:  # speculative decoding: not supported
        return {}
    mask = getattr(runner, "discard_request_mask", None)
    discarded = set(np.nonzero(mask.np[: batch.num_reqs])[0].tolist()) if mask is not None else set()
    by_head: dict[str, list[tuple[str, int]]] = {}
    for rid, name in heads.items():
        row = batch.req_id_to_index.get(rid)
        if row is not None and row not in discarded:
            by_head.setdefault(name, []).append((rid, row))
    values = {}
    for name, rows in by_head.items():
        try:
            logits = self_head.load(name).values(hidden[[r for _, r in rows]])
        except Exception as e:  # no value: the scheduler turns rejection off for these requests
            logger.warning("flopwise self head %s failed in the worker: %s", name, e)
            continue
        values.update(zip((rid for rid, _ in rows), logits))
    return values


class SelfValueMixin:
    """For a vLLM worker class: ``sample_tokens`` that also returns the self heads' values."""

    def sample_tokens(self, grammar_output):
        state = getattr(self.model_runner, "execute_model_state", None)
        heads = getattr(state.scheduler_output, SCHEDULED_ATTR, None) if state is not None else None
        values = head_values(self.model_runner, state, heads) if heads else None
        out = super().sample_tokens(grammar_output)
        if values is not None and out is not None:
            setattr(out, VALUES_ATTR, values)
        return out
