"""vLLM v1 scheduler that charges every scheduled step from the FLOP ledger and enforces FLOP budgets.

The scheduler is the one place that sees what the engine really computes: prefix-cache hits (already
counted in ``num_computed_tokens`` when a request is first scheduled), chunked prefill, preemption and
recompute, vision encoder runs, and work on requests that are later aborted. Each finished request's
charge travels back to the front end on its ``ec_transfer_params`` (unused without an EC connector),
under the key ``"flopwise"``.

n>1 requests reach the engine as independent children ``"{index}_{parent_id}"``. They form one group:
their charges are summed (the last child to finish carries the whole group's cost, aborted siblings
included) and they share one FLOP budget (``SamplingParams.extra_args["flop_budget"]``).

Budgets are enforced before each step (see :mod:`flopwise.budget`): a request whose next step might
cross its group's remaining budget is finished instead of scheduled, with finish_reason ``length`` and
stop_reason ``flop_budget``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from flopwise.budget import FIELD, STOP_REASON, BudgetError, BudgetState, Policy, next_step_bound, parse_budget
from flopwise.ledger import Breakdown, FlopModel
from flopwise_vllm.payload import PAYLOAD_KEY

logger = logging.getLogger("flopwise")
_CHILD = re.compile(r"^\d+_(.+)$")
POLICY_ENV = "FLOPWISE_BUDGET_POLICY"


def group_of(request_id: str) -> str:
    """The parent id of an n>1 child (vLLM names children ``{index}_{parent}``), else the id itself."""
    m = _CHILD.match(request_id)
    return m.group(1) if m else request_id


@dataclass
class Charge:
    """FLOPs charged: ``prompt`` = prefill forwards (and vision), ``completion`` = decode forwards."""

    prompt: Breakdown = field(default_factory=Breakdown)
    completion: Breakdown = field(default_factory=Breakdown)
    dense_baseline: int = 0  # the same work with no flopwise technique on
    requests: int = 0

    @property
    def total(self) -> int:
        return self.prompt.total + self.completion.total

    def merge(self, other: Charge) -> None:
        self.prompt += other.prompt
        self.completion += other.completion
        self.dense_baseline += other.dense_baseline
        self.requests += other.requests


@dataclass
class Group:
    """One client request: its children's settled charges, how many are alive, its shared budget."""

    settled: Charge = field(default_factory=Charge)
    live: int = 0
    budget: BudgetState | None = None

    def payload(self, group_id: str, engine_total: int) -> dict:
        c = self.settled
        out = {
            "group": group_id,
            "requests": c.requests,
            "prompt": c.prompt.total,
            "completion": c.completion.total,
            "total": c.total,
            "dense_baseline": c.dense_baseline,
            "components": (c.prompt + c.completion).as_dict(),
            "engine_total": engine_total,
        }
        if self.budget is not None:
            out.update(budget=self.budget.budget, capped=self.budget.capped)
        return out


class FlopwiseScheduler(Scheduler):
    """``--scheduler-cls flopwise_vllm.scheduler.FlopwiseScheduler``: vLLM's scheduler plus the ledger."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        # Fails loudly at start-up for an architecture the ledger cannot cost.
        self.flop_model = FlopModel.from_pretrained(vllm_config.model_config.hf_config.to_dict())
        self.budget_policy = Policy(os.environ.get(POLICY_ENV, Policy.FIFO.value))
        self.flop_charges: dict[str, Charge] = {}
        self.groups: dict[str, Group] = {}
        self.group_ids: dict[str, str] = {}  # request id -> group id, for live requests
        self.budgeted_groups = 0  # live groups with a budget: the gate is skipped when there are none
        self.engine_flops = 0  # everything this engine computed, finished or not
        self._last_settled: tuple[str, dict | None] = ("", None)
        self._budget_stops: list[tuple[int, EngineCoreOutput]] = []

    # -- admission -----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        g = self.group_ids[request.request_id] = group_of(request.request_id)
        group = self.groups.setdefault(g, Group())
        group.live += 1
        budget = self._budget_of(request)
        if budget is not None and group.budget is None:
            group.budget = BudgetState(budget)
            self.budgeted_groups += 1
        if self.budget_policy is Policy.SMALLEST_BUDGET:
            # vLLM's priority queue (--scheduling-policy priority) admits lower values first.
            request.priority = int(min(budget, 2**62)) if budget is not None else 2**62
        self.flop_charges[request.request_id] = Charge(requests=1)
        super().add_request(request)

    @staticmethod
    def _budget_of(request: Request) -> float | None:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        if not extra or FIELD not in extra:
            return None
        try:
            return parse_budget(extra[FIELD])
        except BudgetError as e:  # the front end validates first; this only guards other callers
            logger.warning("request %s: ignoring %s", request.request_id, e)
            return None

    # -- charging ------------------------------------------------------------------------------------
    def step_cost(self, request: Request, start: int, tokens: int, logits: int) -> tuple[Breakdown, Breakdown]:
        """(charged, dense baseline) FLOPs of ``tokens`` tokens of ``request`` from position ``start``."""
        cost = self.flop_model.forward(tokens, start=start, logits=logits)
        return cost, cost

    def _book(self, request: Request, part: Breakdown, cost: Breakdown, baseline: int) -> None:
        part += cost
        self.flop_charges[request.request_id].dense_baseline += baseline
        self.engine_flops += cost.total
        budget = self.groups[self.group_ids[request.request_id]].budget
        if budget is not None:
            budget.charged += cost.total

    def charge_step(self, request: Request, start: int, tokens: int) -> None:
        """Charge one forward of ``tokens`` tokens at ``start``, split into prompt and completion parts."""
        charge = self.flop_charges[request.request_id]
        in_prompt = max(0, min(start + tokens, request.num_prompt_tokens) - start)
        in_output = tokens - in_prompt
        # vLLM computes one row of logits per request per step, at the step's last position.
        if in_prompt:
            cost, baseline = self.step_cost(request, start, in_prompt, 0 if in_output else 1)
            self._book(request, charge.prompt, cost, baseline.total)
        if in_output:
            cost, baseline = self.step_cost(request, start + in_prompt, in_output, 1)
            self._book(request, charge.completion, cost, baseline.total)

    def charge_encoder(self, request: Request, input_ids: list[int]) -> None:
        for i in input_ids:
            cost = self.flop_model.vision(1, tokens_per_image=request.mm_features[i].mm_position.length)
            self._book(request, self.flop_charges[request.request_id].prompt, cost, cost.total)

    # -- budgets -------------------------------------------------------------------------------------
    def _pending_vision(self, request: Request) -> int:
        """Encoder cost of images whose placeholders the request has not reached yet (a safe bound)."""
        if self.flop_model.spec.vision is None or not request.mm_features:
            return 0
        return sum(self.flop_model.vision(1, tokens_per_image=f.mm_position.length).total
                   for f in request.mm_features if f.mm_position.offset + f.mm_position.length > request.num_computed_tokens)

    def gate_budgets(self) -> None:
        """Finish every request whose next step might cross its group's remaining budget."""
        if not self.budgeted_groups:
            return
        reserved: dict[str, int] = {}
        for request in [*self.running, *self.waiting]:
            g = self.group_ids[request.request_id]
            budget = self.groups[g].budget
            if budget is None or request.is_finished():
                continue
            bound = next_step_bound(self.flop_model, request.num_computed_tokens, request.num_tokens)
            bound += self._pending_vision(request)
            if budget.charged + reserved.get(g, 0) + bound > budget.budget:
                self.stop_for_budget(request)
            else:
                reserved[g] = reserved.get(g, 0) + bound

    def stop_for_budget(self, request: Request) -> None:
        rid, client = request.request_id, request.client_index
        self.groups[self.group_ids[rid]].budget.capped = True
        request.stop_reason = STOP_REASON
        self.finish_requests(rid, RequestStatus.FINISHED_LENGTH_CAPPED)
        settled_id, payload = self._last_settled  # written by _free_request inside finish_requests
        payload = payload if settled_id == rid else None
        self._budget_stops.append((client, EngineCoreOutput(
            request_id=rid, new_token_ids=[], finish_reason=FinishReason.LENGTH, stop_reason=STOP_REASON,
            ec_transfer_params={PAYLOAD_KEY: payload} if payload else None)))

    # -- vLLM hooks ----------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        self.gate_budgets()
        out = super().schedule(*args, **kwargs)
        # super() has already advanced num_computed_tokens past this step's tokens.
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests[rid]
            self.charge_step(request, request.num_computed_tokens - n, n)
        if self.flop_model.spec.vision is not None:
            for rid, inputs in out.scheduled_encoder_inputs.items():
                self.charge_encoder(self.requests[rid], inputs)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        # Requests stopped by the budget gate never reached the model: emit their final outputs here,
        # the way vLLM emits requests it finishes with an error.
        for client, output in self._budget_stops:
            if client in outputs:
                outputs[client].outputs.append(output)
            else:
                outputs[client] = EngineCoreOutputs(outputs=[output])
        self._budget_stops.clear()
        return outputs

    def _free_request(self, request: Request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        payload = self.settle(request.request_id)
        if payload is not None:
            ec_params = {**(ec_params or {}), PAYLOAD_KEY: payload}
        self._last_settled = (request.request_id, payload)
        return kv_params, ec_params

    def settle(self, request_id: str) -> dict | None:
        """Close a request's account into its group; the payload is the group's running total."""
        charge = self.flop_charges.pop(request_id, None)
        if charge is None:
            return None
        g = self.group_ids.pop(request_id)
        group = self.groups[g]
        group.settled.merge(charge)
        payload = group.payload(g, self.engine_flops)
        group.live -= 1
        if group.live <= 0:
            del self.groups[g]
            self.budgeted_groups -= group.budget is not None
        return payload
