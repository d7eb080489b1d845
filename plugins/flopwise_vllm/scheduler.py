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

Early rejection (``extra_args["early_rejection"]``, see :mod:`flopwise_vllm.rejection`) holds a group's
children at each checkpoint until all have reached it, scores them with a PRM and finishes the weak ones.

KV dropping (``extra_args["kv_policy"/"kv_keep"/"kv_keep_tokens"]``, see :mod:`flopwise_vllm.kv`): when a
request's last prefill chunk is scheduled, the scheduler fixes its layout (blocks it shares with another
request stay protected), takes the blocks about to be rewritten out of the prefix cache and sends the job
to the worker; after that step it frees the emptied blocks and charges later steps on the kept context.
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
from flopwise.ledger.cost import context_sum
from flopwise.techniques import early_rejection as er
from flopwise.techniques import kv_drop as kd
from flopwise.techniques import visual_drop as vd
from flopwise.techniques.early_rejection import survivors
from flopwise_vllm.kv import OUTPUT_ATTR, KVJob
from flopwise_vllm.payload import PAYLOAD_KEY
from flopwise_vllm.rejection import Rejection, parse_config

logger = logging.getLogger("flopwise")
_CHILD = re.compile(r"^(\d+)_(.+)$")
POLICY_ENV = "FLOPWISE_BUDGET_POLICY"


def group_of(request_id: str) -> str:
    """The parent id of an n>1 child (vLLM names children ``{index}_{parent}``), else the id itself."""
    m = _CHILD.match(request_id)
    return m.group(2) if m else request_id


def _drop_layer(feature) -> int | None:
    """The tower layer an image's tokens were dropped after (``visual_drop_layer``), if any."""
    data = feature.data
    if data is None or vd.LAYER_FIELD not in data:
        return None
    layer = int(data[vd.LAYER_FIELD].data)
    return layer if layer >= 0 else None


def index_of(request_id: str) -> int:
    """The candidate index of an n>1 child, 0 for a lone request."""
    m = _CHILD.match(request_id)
    return int(m.group(1)) if m else 0


@dataclass
class Charge:
    """FLOPs charged: ``prompt`` = prefill forwards (and vision), ``completion`` = decode forwards."""

    prompt: Breakdown = field(default_factory=Breakdown)
    completion: Breakdown = field(default_factory=Breakdown)
    dense_baseline: int = 0  # the same work with no flopwise technique on
    requests: int = 0
    kv: dict[str, int] = field(default_factory=dict)  # KV dropping: prompt / kept / dropped tokens

    @property
    def total(self) -> int:
        return self.prompt.total + self.completion.total

    def merge(self, other: Charge) -> None:
        self.prompt += other.prompt
        self.completion += other.completion
        self.dense_baseline += other.dense_baseline
        self.requests += other.requests
        for k, v in other.kv.items():
            self.kv[k] = self.kv.get(k, 0) + v


@dataclass
class KVState:
    """A request's KV dropping: its options, where its prefill started, the layout once dropped."""

    config: kd.KVDropConfig
    first: int | None = None  # tokens computed before its first prefill chunk (prefix-cache hits)
    layout: kd.Layout | None = None  # sent to the worker with the last prefill chunk
    applied: bool = False  # the step ran: later steps attend to the kept context only
    stashed: bool = False  # earlier prefill chunks were sent to the worker to keep
    evicted: int = 0  # tail blocks evicted while decoding (token budget)


@dataclass
class Group:
    """One client request: its children's settled charges, how many are alive, its shared budget."""

    settled: Charge = field(default_factory=Charge)
    live: int = 0
    budget: BudgetState | None = None
    members: set[str] = field(default_factory=set)  # live request ids
    rejection: Rejection | None = None

    def payload(self, group_id: str, engine: int, engine_total: int) -> dict:
        c = self.settled
        prm = self.rejection.prm_flops if self.rejection else 0
        out = {
            "group": group_id,
            "requests": c.requests,
            "prompt": c.prompt.total,
            "completion": c.completion.total,
            "total": c.total + prm,
            "dense_baseline": c.dense_baseline,
            "components": (c.prompt + c.completion).as_dict(),
            "engine": engine,  # data-parallel rank: one front end can serve several engines
            "engine_total": engine_total,
        }
        if c.kv:
            out["kv"] = dict(c.kv)
        if self.rejection is not None:
            out.update(prm=prm, early_rejection=self.rejection.stats())
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
        # The engine's data-parallel rank; data_parallel_rank itself reads 0 in every engine of a dense model.
        self.engine_rank = getattr(vllm_config.parallel_config, "data_parallel_index", 0)
        self._last_settled: tuple[str, dict | None] = ("", None)
        self._early_finishes: list[tuple[int, EngineCoreOutput]] = []
        self._tokenizer = None
        self._newlines: frozenset[int] | None = None
        self._image_drops: dict[str, list[tuple[int, int]]] = {}  # request id -> (offset, dropped) per image
        self._kv: dict[str, KVState] = {}
        # KV dropping rewrites the CPU attention backend's block tables; a sliding window already limits reads.
        self.kv_supported = (not self.flop_model.spec.windowed
                             and vllm_config.cache_config.cache_dtype in ("auto", None))

    # -- admission -----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        g = self.group_ids[request.request_id] = group_of(request.request_id)
        group = self.groups.setdefault(g, Group())
        group.live += 1
        group.members.add(request.request_id)
        budget = self._budget_of(request)
        if budget is not None and group.budget is None:
            group.budget = BudgetState(budget)
            self.budgeted_groups += 1
        config = self._rejection_of(request)
        if config is not None:
            group.rejection = group.rejection or Rejection(config)
            group.rejection.started += 1
        kv = self._kv_of(request)
        if kv is not None:
            self._kv[request.request_id] = KVState(kv)
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

    @staticmethod
    def _rejection_of(request: Request) -> er.EarlyRejectionConfig | None:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        try:
            return parse_config((extra or {}).get(er.FIELD))
        except ValueError as e:  # the front end validates first
            logger.warning("request %s: ignoring early_rejection: %s", request.request_id, e)
            return None

    def _kv_of(self, request: Request) -> kd.KVDropConfig | None:
        extra = request.sampling_params.extra_args if request.sampling_params else None
        try:
            config = kd.from_extra(extra)
        except kd.KVDropError as e:  # the front end validates first
            logger.warning("request %s: ignoring KV dropping: %s", request.request_id, e)
            return None
        if config is not None and not self.kv_supported:
            logger.warning("request %s: KV dropping needs full attention and an unquantized KV cache; ignored",
                           request.request_id)
            return None
        return config

    # -- charging ------------------------------------------------------------------------------------
    def step_cost(self, request: Request, start: int, tokens: int, logits: int) -> tuple[Breakdown, Breakdown]:
        """(charged, dense baseline) FLOPs of ``tokens`` tokens of ``request`` from position ``start``."""
        cost = self.flop_model.forward(tokens, start=start, logits=logits)
        kv = self._kv.get(request.request_id)
        if kv is not None and kv.applied and start >= kv.layout.prompt:
            # Each token attends to its context less the dropped (and evicted) tokens.
            gone = kv.layout.dropped_tokens + kv.evicted * kv.layout.block_size
            context = context_sum(start, tokens) - tokens * gone
            return self.flop_model.forward(tokens, start=start, logits=logits, context=context), cost
        if not request.mm_features:
            return cost, cost
        # Visual token dropping: without it, the step holding an image's placeholders would have processed
        # its dropped tokens too, and every later position would sit that much further on.
        drops = self._image_drops.get(request.request_id)
        if drops is None:  # once per request: this runs every step
            drops = self._image_drops[request.request_id] = [
                (f.mm_position.offset, self.full_image_tokens(f) - f.mm_position.length) for f in request.mm_features]
        before = sum(d for offset, d in drops if offset < start)
        inside = sum(d for offset, d in drops if start <= offset < start + tokens)
        if not (before or inside):
            return cost, cost
        return cost, self.flop_model.forward(tokens + inside, start=start + before, logits=logits)

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

    def full_image_tokens(self, feature) -> int:
        """LM tokens of an image before visual dropping (its placeholders are the kept ones)."""
        data, vision = feature.data, self.flop_model.spec.vision
        if data is not None and "image_grid_thw" in data:  # Qwen2-VL: the image's own grid
            return int(data["image_grid_thw"].data.prod()) // (vision.merge * vision.merge)
        if vision is not None and vision.kind == "clip":  # LLaVA-1.5: fixed resolution
            return vision.tokens_per_image
        return feature.mm_position.length

    def vision_cost(self, feature) -> Breakdown:
        """One image's encoder run. With visual dropping the placeholders are the kept tokens only: LLaVA
        prunes before its projector (so charge the projector on those), Qwen2-VL after its whole grid."""
        if self.flop_model.spec.vision.kind == "clip":
            layer = _drop_layer(feature)
            kept = feature.mm_position.length
            after = layer if layer is not None and kept < self.full_image_tokens(feature) else None
            return self.flop_model.vision(1, tokens_per_image=kept, kept_after_layer=after)
        return self.flop_model.vision(1, tokens_per_image=self.full_image_tokens(feature))

    def charge_encoder(self, request: Request, input_ids: list[int]) -> None:
        for i in input_ids:
            feature = request.mm_features[i]
            cost = self.vision_cost(feature)
            baseline = self.flop_model.vision(1, tokens_per_image=self.full_image_tokens(feature))
            self._book(request, self.flop_charges[request.request_id].prompt, cost, baseline.total)

    # -- budgets -------------------------------------------------------------------------------------
    def _pending_vision(self, request: Request) -> int:
        """Encoder cost of images whose placeholders the request has not reached yet (a safe bound)."""
        if self.flop_model.spec.vision is None or not request.mm_features:
            return 0
        return sum(self.vision_cost(f).total for f in request.mm_features
                   if f.mm_position.offset + f.mm_position.length > request.num_computed_tokens)

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
        self.groups[self.group_ids[request.request_id]].budget.capped = True
        self.finish_now(request, RequestStatus.FINISHED_LENGTH_CAPPED, FinishReason.LENGTH, STOP_REASON)

    def finish_now(self, request: Request, status: RequestStatus, reason: FinishReason, stop_reason: str) -> None:
        """Finish a request outside a model step and emit its final output with the next step's outputs."""
        rid, client = request.request_id, request.client_index
        request.stop_reason = stop_reason
        self.finish_requests(rid, status)
        settled_id, payload = self._last_settled  # written by _free_request inside finish_requests
        payload = payload if settled_id == rid else None
        self._early_finishes.append((client, EngineCoreOutput(
            request_id=rid, new_token_ids=[], finish_reason=reason, stop_reason=stop_reason,
            ec_transfer_params={PAYLOAD_KEY: payload} if payload else None)))

    # -- early rejection -----------------------------------------------------------------------------
    def _text(self, token_ids, special: bool) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.vllm_config.model_config.tokenizer)
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=not special)

    def _score(self, group: Group, requests: list[Request], final: bool) -> list[float] | None:
        """PRM scores of ``requests``' answers so far, charged to the group; None if it cannot run."""
        rej = group.rejection
        try:
            prm = rej.prm()
            texts = [(self._text(r.prompt_token_ids, True), self._text(r.output_token_ids, False)) for r in requests]
            cost = sum(prm.cost(p, a, final) for p, a in texts)
            if group.budget is not None and group.budget.charged + cost > group.budget.budget:
                rej.fail("skipped", f"scoring would cross the flop_budget ({cost:,} PRM FLOPs)")
                return None
            scores = [prm.score(p, a, final=final)[0] for p, a in texts]
        except Exception as e:  # any PRM failure: serve the request without rejection, and say so
            rej.fail("PRM failed", f"{type(e).__name__}: {e}")
            return None
        rej.prm_flops += cost
        self.engine_flops += cost
        if group.budget is not None:
            group.budget.charged += cost
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

    def run_checkpoints(self) -> list[Request]:
        """Score and reject where every live candidate reached its group's checkpoint; return those to hold."""
        held: list[Request] = []
        for group in [g for g in self.groups.values() if g.rejection is not None and g.rejection.active]:
            rej = group.rejection
            live = sorted((self.requests[rid] for rid in group.members if not self.requests[rid].is_finished()),
                          key=lambda r: index_of(r.request_id))
            if not rej.config.rejects_at(len(live)):
                # Nothing to reject among this many; re-checked each step because siblings may still be
                # arriving (vLLM adds the children one by one).
                continue
            reached = [r for r in live if self._reached(rej, r)]
            if len(reached) < len(live):
                held += [r for r in reached if r.status == RequestStatus.RUNNING]  # a preempted one waits anyway
                continue
            scores = self._score(group, live, final=False)
            if scores is None:
                continue
            rej.checkpoints += 1
            rej.next_checkpoint += 1
            kept = {live[i].request_id for i in survivors(scores, rej.config.keep_count(len(live)))}
            for r in live:
                if r.request_id not in kept:
                    rej.rejected[index_of(r.request_id)] = rej.checkpoints
                    self.finish_now(r, RequestStatus.FINISHED_ABORTED, FinishReason.ABORT, er.STOP_REASON)
        return held

    # -- vLLM hooks ----------------------------------------------------------------------------------
    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        self.gate_budgets()
        held = self.run_checkpoints()
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
        if self._kv:  # before charging: an eviction planned now already shortens this step's context
            self.plan_kv(out)
        # super() has already advanced num_computed_tokens past this step's tokens.
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests[rid]
            self.charge_step(request, request.num_computed_tokens - n, n)
        if self.flop_model.spec.vision is not None:
            for rid, inputs in out.scheduled_encoder_inputs.items():
                self.charge_encoder(self.requests[rid], inputs)
        return out

    # -- KV dropping ---------------------------------------------------------------------------------
    def plan_kv(self, out: SchedulerOutput) -> None:
        """Attach this step's KV jobs to the scheduler output (see :mod:`flopwise_vllm.kv`)."""
        for rid in out.preempted_req_ids or ():
            if rid in self._kv:  # its blocks are gone; it prefills (and drops) again
                self._kv[rid] = KVState(self._kv[rid].config)
        jobs: dict[str, KVJob] = {}
        for rid, n in out.num_scheduled_tokens.items():
            kv = self._kv.get(rid)
            if kv is None:
                continue
            request = self.requests[rid]
            prompt = request.num_prompt_tokens
            if request.num_computed_tokens - n >= prompt:  # decoding: evict under a token budget
                if kv.applied and kv.config.tokens is not None:
                    self._evict(request, kv, request.num_computed_tokens - n, jobs)
                continue
            if kv.first is None:
                kv.first = request.num_computed_tokens - n
            protected = -(-kv.first // self.block_size)  # a partly hit block is not ours to rewrite
            if request.num_computed_tokens < prompt:  # an earlier chunk: the worker stashes it
                if kd.layout(kv.config, prompt, self.block_size, protected).active:
                    jobs[rid] = KVJob(kv.config.policy, kv.first, prompt)
                    kv.stashed = True
                continue
            blocks = self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[rid]
            for i in range(protected, min(prompt // self.block_size, len(blocks))):
                if blocks[i].ref_cnt > 1:  # shared with another request: never dropped under it
                    protected = i + 1
            lay = kd.layout(kv.config, prompt, self.block_size, protected)
            if not lay.active:
                if kv.stashed:  # nothing to drop after all (shared blocks): the worker lets its stash go
                    jobs[rid] = KVJob(kv.config.policy, kv.first, prompt, lay)
                if kv.config.tokens is not None:  # the budget still holds while generating
                    kv.layout, kv.applied = lay, True
                continue
            # The region's blocks leave the prefix cache: the kept ones are about to be rewritten, and the
            # dropped ones, freed after this step, could never be hit past them (hits are prefix chains).
            # Unhashed, freed blocks are the first the pool hands out again.
            for block in blocks[lay.protected:lay.full]:
                self.kv_cache_manager.block_pool._maybe_evict_cached_block(block)
            kv.layout = lay
            jobs[rid] = KVJob(kv.config.policy, kv.first, prompt, lay)
            if not lay.kept:  # the whole region goes: nothing is scored
                continue
            policy = kd.get_policy(kv.config.policy)
            scoring = Breakdown()
            for layer in self.flop_model.spec.layers:
                scoring.add("kv_scoring", policy.scoring_flops(prompt - kv.first, layer.q_heads, layer.head_dim))
            self._book(request, self.flop_charges[rid].prompt, scoring, 0)
        if jobs:
            setattr(out, OUTPUT_ATTR, jobs)

    def _evict(self, request: Request, kv: KVState, cached: int, jobs: dict[str, KVJob]) -> None:
        """Free the oldest tail blocks that put the request's KV a block over its token budget."""
        lay, before = kv.layout, kv.evicted
        while kd.evicts(lay, kv.evicted, cached, kv.config.tokens):
            kv.evicted += 1
        if kv.evicted == before:
            return
        rid = request.request_id
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            manager._remove_blocks_in_range(rid, lay.full + before, lay.full + kv.evicted)
        jobs[rid] = KVJob(kv.config.policy, kv.first, lay.prompt, lay, kv.evicted)
        charge = self.flop_charges.get(rid)
        if charge is not None:
            charge.kv = {**self._kv_stats(lay), "evicted_tokens": kv.evicted * lay.block_size}

    @staticmethod
    def _kv_stats(lay: kd.Layout) -> dict[str, int]:
        return {"prompt_tokens": lay.prompt, "kept_tokens": lay.kept_tokens, "dropped_tokens": lay.dropped_tokens,
                "dropped_blocks": lay.dropped_blocks}

    def apply_kv(self, scheduler_output) -> None:
        """After the step that dropped: the region's emptied blocks go back to the pool."""
        for rid, job in (getattr(scheduler_output, OUTPUT_ATTR, None) or {}).items():
            kv, lay = self._kv.get(rid), job.layout
            if kv is None or lay is None or not lay.active or kv.layout is not lay or kv.applied:
                continue  # (an eviction update is applied when planned)
            for manager in self.kv_cache_manager.coordinator.single_type_managers:
                manager._remove_blocks_in_range(rid, lay.protected + lay.kept, lay.full)
            kv.applied = True
            charge = self.flop_charges.get(rid)
            if charge is not None:
                charge.kv = self._kv_stats(lay)

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._kv:
            self.apply_kv(scheduler_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        # Requests stopped by the budget gate or rejected never reached the model: emit their final outputs here,
        # the way vLLM emits requests it finishes with an error.
        for client, output in self._early_finishes:
            if client in outputs:
                outputs[client].outputs.append(output)
            else:
                outputs[client] = EngineCoreOutputs(outputs=[output])
        self._early_finishes.clear()
        return outputs

    def _free_request(self, request: Request, *args, **kwargs):
        group = self.groups.get(self.group_ids.get(request.request_id, ""))
        if group is not None and group.rejection is not None:
            self._close_candidate(group, request)
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        payload = self.settle(request.request_id)
        if payload is not None:
            ec_params = {**(ec_params or {}), PAYLOAD_KEY: payload}
        self._last_settled = (request.request_id, payload)
        return kv_params, ec_params

    def settle(self, request_id: str) -> dict | None:
        """Close a request's account into its group; the payload is the group's running total."""
        charge = self.flop_charges.pop(request_id, None)
        self._image_drops.pop(request_id, None)
        self._kv.pop(request_id, None)
        if charge is None:
            return None
        g = self.group_ids.pop(request_id)
        group = self.groups[g]
        group.members.discard(request_id)
        group.settled.merge(charge)
        payload = group.payload(g, self.engine_rank, self.engine_flops)
        group.live -= 1
        if group.live <= 0:
            del self.groups[g]
            self.budgeted_groups -= group.budget is not None
        return payload

    def _close_candidate(self, group: Group, request: Request) -> None:
        """Record a candidate's length; a candidate that finished on its own gets its final PRM score."""
        rej, i = group.rejection, index_of(request.request_id)
        rej.lengths[i] = request.num_output_tokens
        natural = request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if natural and i not in rej.rejected and rej.error is None:
            self._score(group, [request], final=True)
