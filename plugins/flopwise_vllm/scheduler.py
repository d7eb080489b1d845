"""vLLM v1 scheduler that charges every scheduled step to its request from the FLOP ledger.

The scheduler is the one place that sees what the engine really computes: prefix-cache hits (already
counted in ``num_computed_tokens`` when a request is first scheduled), chunked prefill, preemption and
recompute, vision encoder runs, and work on requests that are later aborted. Each finished request's
charge travels back to the front end on its ``ec_transfer_params`` (unused without an EC connector),
under the key ``"flopwise"``.

n>1 requests reach the engine as independent children ``"{index}_{parent_id}"``; their charges are
summed per parent so that the last child to finish carries the whole group's cost, rejected
(aborted) siblings included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from flopwise.ledger import Breakdown, FlopModel

PAYLOAD_KEY = "flopwise"
_CHILD = re.compile(r"^\d+_(.+)$")


def group_of(request_id: str) -> str:
    """The parent id of an n>1 child (vLLM names children ``{index}_{parent}``), else the id itself."""
    m = _CHILD.match(request_id)
    return m.group(1) if m else request_id


@dataclass
class Charge:
    """FLOPs charged so far: ``prompt`` = prefill forwards, ``completion`` = decode forwards."""

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

    def payload(self, group: str, engine_total: int) -> dict:
        return {
            "group": group,
            "requests": self.requests,
            "prompt": self.prompt.total,
            "completion": self.completion.total,
            "total": self.total,
            "dense_baseline": self.dense_baseline,
            "components": (self.prompt + self.completion).as_dict(),
            "engine_total": engine_total,
        }


class FlopwiseScheduler(Scheduler):
    """``--scheduler-cls flopwise_vllm.scheduler.FlopwiseScheduler``: vLLM's scheduler plus the ledger."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        # Fails loudly at start-up for an architecture the ledger cannot cost.
        self.flop_model = FlopModel.from_pretrained(vllm_config.model_config.hf_config.to_dict())
        self.flop_charges: dict[str, Charge] = {}
        self._groups: dict[str, Charge] = {}
        self._group_live: dict[str, int] = {}
        self.engine_flops = 0  # everything this engine computed, finished or not

    # -- bookkeeping ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self.flop_charges[request.request_id] = Charge(requests=1)
        g = group_of(request.request_id)
        self._group_live[g] = self._group_live.get(g, 0) + 1

    def step_cost(self, request: Request, start: int, tokens: int, logits: int) -> tuple[Breakdown, Breakdown]:
        """(charged, dense baseline) FLOPs of ``tokens`` tokens of ``request`` from position ``start``."""
        cost = self.flop_model.forward(tokens, start=start, logits=logits)
        return cost, cost

    def charge_step(self, request: Request, start: int, tokens: int) -> None:
        """Charge one forward of ``tokens`` tokens at ``start``, split into prompt and completion parts."""
        charge = self.flop_charges[request.request_id]
        prompt_len = request.num_prompt_tokens
        in_prompt = max(0, min(start + tokens, prompt_len) - start)
        in_output = tokens - in_prompt
        # vLLM computes one row of logits per request per step, at the step's last position.
        for part, n, s, logits in (
            (charge.prompt, in_prompt, start, 0 if in_output else 1),
            (charge.completion, in_output, start + in_prompt, 1),
        ):
            if n:
                cost, baseline = self.step_cost(request, s, n, logits)
                part += cost
                charge.dense_baseline += baseline.total
                self.engine_flops += cost.total

    def charge_encoder(self, request: Request, input_ids: list[int]) -> None:
        charge = self.flop_charges[request.request_id]
        for i in input_ids:
            tokens = request.mm_features[i].mm_position.length
            cost = self.flop_model.vision(1, tokens_per_image=tokens)
            charge.prompt += cost
            charge.dense_baseline += cost.total
            self.engine_flops += cost.total

    # -- vLLM hooks ----------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        out = super().schedule(*args, **kwargs)
        # super() has already advanced num_computed_tokens past this step's tokens.
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests[rid]
            self.charge_step(request, request.num_computed_tokens - n, n)
        if self.flop_model.spec.vision is not None:
            for rid, inputs in out.scheduled_encoder_inputs.items():
                self.charge_encoder(self.requests[rid], inputs)
        return out

    def _free_request(self, request: Request, *args, **kwargs):
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        payload = self.settle(request.request_id)
        if payload is not None:
            ec_params = {**(ec_params or {}), PAYLOAD_KEY: payload}
        return kv_params, ec_params

    def settle(self, request_id: str) -> dict | None:
        """Close a request's account into its group; the payload is the group's running total."""
        charge = self.flop_charges.pop(request_id, None)
        if charge is None:
            return None
        g = group_of(request_id)
        group = self._groups.setdefault(g, Charge())
        group.merge(charge)
        payload = group.payload(g, self.engine_flops)
        self._group_live[g] -= 1
        if self._group_live[g] <= 0:
            del self._group_live[g], self._groups[g]
        return payload
