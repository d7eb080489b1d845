"""vLLM v1 scheduler with flopwise's components on its override points.

Each job is one component, one module: the :class:`~flopwise_vllm.accountant.Accountant` (step costs,
charges, groups, the payload), the :class:`~flopwise_vllm.budget_gate.BudgetGate`, the
:class:`~flopwise_vllm.early_rejection.RejectionController` and the
:class:`~flopwise_vllm.kv_planner.KVPlanner`. The scheduler parses each request's options once
(:func:`flopwise_vllm.options.engine_options`), hands each component its part, and calls them at the
points below. A finished request's charge travels back to the front end on its ``ec_transfer_params``
(unused without an EC connector) under ``"flopwise"`` (:mod:`flopwise_vllm.payload`).

Requests the scheduler finishes itself (the budget gate's, early rejection's) never reach the model, so
their final outputs are emitted with the next step's, the way vLLM emits requests it finishes with an
error.
"""

from __future__ import annotations

import logging
import time

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from flopwise.budget import STOP_REASON, Policy
from flopwise.ledger import FlopModel
from flopwise.options import RequestOptions
from flopwise.techniques import OptionError
from flopwise.techniques import early_rejection as er
from flopwise_vllm.accountant import Accountant
from flopwise_vllm.budget_gate import BudgetGate
from flopwise_vllm.early_rejection import RejectionController
from flopwise_vllm.kv_cache_io import readable_isa
from flopwise_vllm.kv_drop import kv_supported
from flopwise_vllm.kv_planner import KVPlanner
from flopwise_vllm.options import engine_options, server_defaults
from flopwise_vllm.payload import PAYLOAD_KEY

logger = logging.getLogger("flopwise")


class FlopwiseScheduler(Scheduler):
    """``--scheduler-cls flopwise_vllm.scheduler.FlopwiseScheduler``: vLLM's scheduler plus the ledger."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        # Fails loudly at start-up for an architecture the ledger cannot cost.
        model = FlopModel.from_pretrained(vllm_config.model_config.hf_config.to_dict())
        self.budget_policy = server_defaults().budget_policy
        # data_parallel_rank reads 0 in every engine of a dense model; the index tells the engines apart.
        self.ledger = Accountant(model, getattr(vllm_config.parallel_config, "data_parallel_index", 0))
        supported = kv_supported(vllm_config, model)
        self.kv = KVPlanner(self, model, self.ledger, supported, supported and readable_isa(vllm_config))
        self.ledger.context_cuts.append(self.kv.context_cut)
        self.rejection = RejectionController(self.ledger, vllm_config.model_config.tokenizer)
        self.gate = BudgetGate(self.ledger, [self.kv.pending_scoring, self.rejection.pending_scoring])
        self._early_finishes: list[tuple[int, EngineCoreOutput]] = []

    def _options(self, request: Request) -> RequestOptions:
        try:
            return engine_options(request.sampling_params.extra_args if request.sampling_params else None)
        except OptionError as e:  # the front end validates first; this only guards other callers
            logger.warning("request %s: ignoring flopwise options: %s", request.request_id, e)
            return RequestOptions()

    def add_request(self, request: Request) -> None:
        opts = self._options(request)
        group = self.ledger.open(request, opts.flop_budget)
        self.rejection.open(request, group, opts.early_rejection, opts.candidates)
        self.kv.open(request, opts.kv)
        if self.budget_policy is Policy.SMALLEST_BUDGET:
            # vLLM's priority queue (--scheduling-policy priority) admits lower values first.
            budget = opts.flop_budget
            request.priority = int(min(budget, 2**62)) if budget is not None else 2**62
        super().add_request(request)

    def _get_local_prefix_cache_hit(self, request: Request):
        blocks, hit, boundary, diverged = super()._get_local_prefix_cache_hit(request)
        blocks, hit = self.kv.cap_hit(request, blocks, hit)
        return blocks, hit, boundary, diverged

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        for request in self.gate.over_budget([*self.running, *self.waiting]):
            self.finish_now(request, RequestStatus.FINISHED_LENGTH_CAPPED, FinishReason.LENGTH, STOP_REASON)
        held, rejected = self.rejection.checkpoints(self.requests)
        for request in rejected:
            self.finish_now(request, RequestStatus.FINISHED_ABORTED, FinishReason.ABORT, er.STOP_REASON)
        parked = self.rejection.parked()
        if parked:  # out of the waiting queue for this step only (back in front after: none is due yet)
            self.waiting.remove_requests(parked)
        if held:  # out of the running list for this step only: they keep their KV blocks and their slots
            ids = {r.request_id for r in held}
            self.running = [r for r in self.running if r.request_id not in ids]
            self.max_num_active_reqs -= len(held)
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            if held:
                self.max_num_active_reqs += len(held)
                self.running[:0] = held
            if parked:
                self.waiting.prepend_requests(parked)
        if held and not out.total_num_scheduled_tokens:
            # Nothing could run: the blocks the held candidates keep are what the others (their siblings
            # among them) need. Give them up; the candidates wait at their checkpoint, recomputed later.
            for request in held:
                self.running.remove(request)
                self._preempt_request(request, time.monotonic())
        # before charging: an eviction planned now shortens this step's context
        self.kv.plan(out, self.requests)
        self.rejection.plan(out)
        self.ledger.charge_scheduled(out, self.requests)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        self.kv.apply(scheduler_output)
        self.rejection.observe(model_runner_output)  # before a candidate's last token finishes it
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.rejection.strip(outputs)
        for client, output in self._early_finishes:
            if client in outputs:
                outputs[client].outputs.append(output)
            else:
                outputs[client] = EngineCoreOutputs(outputs=[output])
        self._early_finishes.clear()
        return outputs

    def _free_request(self, request: Request, *args, **kwargs):
        payload = self.close(request, request.status)
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        if payload is not None:
            ec_params = {**(ec_params or {}), PAYLOAD_KEY: payload}
        return kv_params, ec_params

    def close(self, request: Request, status: RequestStatus) -> dict | None:
        """Settle a finishing request once (its last PRM score first); -> its group's payload, None if
        closed."""
        rid = request.request_id
        if not self.ledger.is_open(rid):
            return None
        self.rejection.close(request, self.ledger.group(rid), status)
        self.kv.forget(rid)
        return self.ledger.settle(rid)

    def finish_now(
        self, request: Request, status: RequestStatus, reason: FinishReason, stop_reason: str
    ) -> None:
        """Finish a request outside a model step; its final output goes out with the next step's outputs."""
        request.stop_reason = stop_reason
        payload = self.close(request, status)
        self.finish_requests(request.request_id, status)
        self._early_finishes.append(
            (
                request.client_index,
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    ec_transfer_params={PAYLOAD_KEY: payload} if payload else None,
                ),
            )
        )
