"""The scheduler's accountant: what each scheduled step costs, who is charged, and the payload at the end.

The scheduler is the one place that sees what the engine really computes: prefix-cache hits (already
counted in ``num_computed_tokens`` when a request is first scheduled), chunked prefill, preemption and
recompute, vision encoder runs, and work on requests that are later aborted. The accountant costs every
scheduled step with the ledger (:mod:`flopwise.ledger`) and keeps two figures per request: what was
charged, and the ``dense_baseline`` (the same work with no technique on).

n>1 requests reach the engine as independent children ``"{index}_{parent_id}"``. They form one
:class:`Group`: their charges are summed (the last child to finish carries the whole group's cost,
aborted siblings included) and they share one FLOP budget. A technique that changes a step's cost tells
the accountant through a *context cut* (tokens its attention no longer reads, e.g. KV dropping), so the
budget gate bounds a step with the same cost the charge uses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vllm.v1.request import Request

from flopwise.budget import BudgetState
from flopwise.ledger import Breakdown, FlopModel
from flopwise.ledger.cost import context_sum
from flopwise.techniques import anyres
from flopwise.techniques import visual_drop as vd
from flopwise_vllm.payload import Charge, make_payload
from flopwise_vllm.visual_drop import feature_config

ONEVISION = "LlavaOnevisionForConditionalGeneration"

_CHILD = re.compile(r"^(\d+)_(.+)$")
# (request, first position of the step) -> tokens of its context attention no longer reads
ContextCut = Callable[[Request, int], int]


def group_of(request_id: str) -> str:
    """The parent id of an n>1 child (vLLM names children ``{index}_{parent}``), else the id itself."""
    m = _CHILD.match(request_id)
    return m.group(2) if m else request_id


def index_of(request_id: str) -> int:
    """The candidate index of an n>1 child, 0 for a lone request."""
    m = _CHILD.match(request_id)
    return int(m.group(1)) if m else 0


@dataclass
class Group:
    """One client request: its children's settled charges, who is alive, its shared budget, and the
    techniques' reports for its payload (name -> a function giving a JSON-able dict)."""

    settled: Charge = field(default_factory=Charge)
    live: int = 0
    budget: BudgetState | None = None
    members: set[str] = field(default_factory=set)  # live request ids
    reports: dict[str, Callable[[], dict]] = field(default_factory=dict)


class Accountant:
    def __init__(self, flop_model: FlopModel, engine_rank: int = 0):
        self.model = flop_model
        self.engine_rank = engine_rank  # the data-parallel rank: one front end can serve several engines
        self.charges: dict[str, Charge] = {}
        self.groups: dict[str, Group] = {}
        self.group_ids: dict[str, str] = {}  # request id -> group id, for live requests
        self.budgeted_groups = 0  # live groups with a budget: the gate is skipped when there are none
        self.engine_flops = 0  # everything this engine computed, finished or not
        self.context_cuts: list[ContextCut] = []
        self._image_drops: dict[str, list[tuple[int, int]]] = {}  # request id -> (offset, dropped) per image
        # anyres image size -> its layout: the admission bound asks for it at every step the image is pending
        self._layouts: dict[tuple[int, ...], tuple[int, int, int]] = {}

    # -- requests and groups -------------------------------------------------------------------------
    def open(self, request: Request, budget: float | None) -> Group:
        rid = request.request_id
        g = self.group_ids[rid] = group_of(rid)
        group = self.groups.setdefault(g, Group())
        group.live += 1
        group.members.add(rid)
        if budget is not None and group.budget is None:
            group.budget = BudgetState(budget)
            self.budgeted_groups += 1
        self.charges[rid] = Charge(requests=1)
        return group

    def is_open(self, request_id: str) -> bool:
        return request_id in self.charges

    def group(self, request_id: str) -> Group:
        return self.groups[self.group_ids[request_id]]

    def settle(self, request_id: str) -> dict | None:
        """Close a request's account into its group; the payload is the group's running total."""
        charge = self.charges.pop(request_id, None)
        self._image_drops.pop(request_id, None)
        if charge is None:
            return None
        g = self.group_ids.pop(request_id)
        group = self.groups[g]
        group.members.discard(request_id)
        group.settled.merge(charge)
        budget = group.budget
        payload = make_payload(
            g,
            group.settled,
            self.engine_rank,
            self.engine_flops,
            {name: report() for name, report in group.reports.items()},
            budget.budget if budget else None,
            budget.capped if budget else False,
        )
        group.live -= 1
        if group.live <= 0:
            del self.groups[g]
            self.budgeted_groups -= group.budget is not None
        return payload

    # -- costs ---------------------------------------------------------------------------------------
    def step_cost(
        self, request: Request, start: int, tokens: int, logits: int
    ) -> tuple[Breakdown, Breakdown]:
        """(charged, dense baseline) FLOPs of ``tokens`` tokens of ``request`` from position ``start``."""
        cost = self.model.forward(tokens, start=start, logits=logits)
        gone = sum(cut(request, start) for cut in self.context_cuts)
        if gone:  # each token attends to its context less what a technique dropped
            context = context_sum(start, tokens) - tokens * gone
            return self.model.forward(tokens, start=start, logits=logits, context=context), cost
        if not request.mm_features:
            return cost, cost
        # Visual token dropping: without it, the step holding an image's placeholders would have processed
        # its dropped tokens too, and every later position would sit that much further on.
        drops = self._image_drops.get(request.request_id)
        if drops is None:  # once per request: this runs every step
            drops = self._image_drops[request.request_id] = [
                (f.mm_position.offset, self.full_image_tokens(f) - f.mm_position.length)
                for f in request.mm_features
            ]
        before = sum(d for offset, d in drops if offset < start)
        inside = sum(d for offset, d in drops if start <= offset < start + tokens)
        if not (before or inside):
            return cost, cost
        return cost, self.model.forward(tokens + inside, start=start + before, logits=logits)

    def next_step_bound(self, request: Request) -> int:
        """The most ``request``'s next forward can be charged: all its remaining prompt tokens at once in
        prefill (a smaller chunk costs less), one token in decode; on the cost model the charge uses (kept
        KV context, kept image tokens), plus the encoder runs of images it has not reached yet."""
        start = request.num_computed_tokens
        remaining = max(1, request.num_tokens - start)
        bound = self.step_cost(request, start, remaining, 1)[0].total
        if self.model.spec.vision is not None and request.mm_features:
            bound += sum(
                self.vision_cost(f).total
                for f in request.mm_features
                if f.mm_position.offset + f.mm_position.length > start
            )
        return bound

    def full_image_tokens(self, feature) -> int:
        """LM tokens of an image before visual dropping (its placeholders are the kept ones)."""
        data, vision = feature.data, self.model.spec.vision
        if data is not None and "image_grid_thw" in data:  # Qwen2-VL: the image's own grid
            return int(data["image_grid_thw"].data.prod()) // (vision.merge * vision.merge)
        if (layout := self._anyres(feature)) is not None:
            return layout[1]
        if vision is not None and vision.kind == "clip":  # LLaVA-1.5: fixed resolution
            return vision.tokens_per_image
        return feature.mm_position.length

    def vision_cost(self, feature) -> Breakdown:
        """One image's encoder run. With visual dropping the placeholders are the kept tokens only: LLaVA and
        LLaVA-NeXT prune before their projector (so charge the projector on those, unless the method selected
        on its output), Qwen2-VL and LLaVA-OneVision after it (the whole image's run)."""
        if self.model.spec.vision.kind != "clip":
            return self.full_image_cost(feature)
        config, kept = feature_config(feature.data), feature.mm_position.length
        if (layout := self._anyres(feature)) is not None:
            if config is None or not config.active or self.model.spec.architecture == ONEVISION:
                return self.full_image_cost(feature)
            return self.model.vision(
                1, projected=kept - layout[2], crops=layout[0]
            )  # newlines: not projected
        cut = config is not None and kept < self.full_image_tokens(feature)
        after = config.layer if cut else None
        projected = (
            self.full_image_tokens(feature) if cut and vd.get_method(config.method).uses_text else None
        )
        return self.model.vision(1, tokens_per_image=kept, kept_after_layer=after, projected=projected)

    def full_image_cost(self, feature) -> Breakdown:
        """The encoder run on every token of the image (Qwen's: always; the others' dense baseline)."""
        if (layout := self._anyres(feature)) is not None:  # the projector runs on every crop's tokens
            crops = layout[0]
            return self.model.vision(
                1, projected=(1 + crops) * self.model.spec.vision.tokens_per_image, crops=crops
            )
        grid = None
        if feature.data is not None and "image_grid_thw" in feature.data:  # Qwen: its attention windows
            merge = self.model.spec.vision.merge
            t, h, w = (int(x) for x in feature.data["image_grid_thw"].data.tolist())
            grid = (t, h // merge, w // merge)
        return self.model.vision(1, tokens_per_image=self.full_image_tokens(feature), grid=grid)

    def _anyres(self, feature) -> tuple[int, int, int] | None:
        """Anyres LLaVA: an image's (crops, LM tokens before dropping, row newlines); None for the others.
        Stock vLLM projects every crop's tokens, the padding's included, then cuts the padding away."""
        v = self.model.spec.vision
        if v is None or not v.min_crops or feature.data is None or "image_sizes" not in feature.data:
            return None
        size = tuple(int(x) for x in feature.data["image_sizes"].data.tolist())
        if size not in self._layouts:
            if len(self._layouts) >= 4096:  # a server sees endless sizes: stay bounded
                self._layouts.clear()
            cfg = self.model.spec.extra["config"]
            tile, aspect = cfg["vision_config"]["image_size"], cfg.get("vision_aspect_ratio")
            grid, tokens, rows = anyres.layout(size, cfg["image_grid_pinpoints"], tile, v.patch_size, aspect)
            self._layouts[size] = grid[0] * grid[1], v.tokens_per_image + tokens + rows, rows
        return self._layouts[size]

    # -- charging ------------------------------------------------------------------------------------
    def book(self, request: Request, part: Breakdown, cost: Breakdown, baseline: int) -> None:
        part += cost
        self.charges[request.request_id].dense_baseline += baseline
        self._spend(self.group(request.request_id), cost.total)

    def _spend(self, group: Group, flops: int) -> None:
        self.engine_flops += flops
        if group.budget is not None:
            group.budget.charged += flops

    def charge_step(self, request: Request, start: int, tokens: int) -> None:
        """Charge one forward of ``tokens`` tokens at ``start``, split into prompt and completion parts."""
        charge = self.charges[request.request_id]
        in_prompt = max(0, min(start + tokens, request.num_prompt_tokens) - start)
        in_output = tokens - in_prompt
        # vLLM computes one row of logits per request per step, at the step's last position.
        if in_prompt:
            cost, baseline = self.step_cost(request, start, in_prompt, 0 if in_output else 1)
            self.book(request, charge.prompt, cost, baseline.total)
        if in_output:
            cost, baseline = self.step_cost(request, start + in_prompt, in_output, 1)
            self.book(request, charge.completion, cost, baseline.total)

    def charge_extra(self, request: Request, component: str, flops: int, decode: bool = False) -> None:
        """Work a technique did for a request's prompt (or, ``decode``, while generating; e.g. KV scoring):
        charged, not in the baseline."""
        part, charge = Breakdown(), self.charges[request.request_id]
        part.add(component, flops)
        self.book(request, charge.completion if decode else charge.prompt, part, 0)

    def charge_group_extra(self, group: Group, name: str, flops: int) -> None:
        """Work outside the generator's forwards done for a whole group (e.g. ``prm``: reward-model
        passes)."""
        group.settled.extra[name] = group.settled.extra.get(name, 0) + flops
        self._spend(group, flops)

    def charge_encoder(self, request: Request, input_ids: list[int]) -> None:
        for i in input_ids:
            feature = request.mm_features[i]
            baseline = self.full_image_cost(feature)
            self.book(
                request, self.charges[request.request_id].prompt, self.vision_cost(feature), baseline.total
            )

    def charge_scheduled(self, out, requests: dict[str, Request]) -> None:
        """Charge every step in a scheduler output (vLLM has already advanced ``num_computed_tokens``)."""
        for rid, n in out.num_scheduled_tokens.items():
            request = requests[rid]
            self.charge_step(request, request.num_computed_tokens - n, n)
        if self.model.spec.vision is not None:
            for rid, inputs in out.scheduled_encoder_inputs.items():
                self.charge_encoder(requests[rid], inputs)

    def set_kv_stats(self, request_id: str, stats: dict) -> None:
        charge = self.charges.get(request_id)
        if charge is not None:
            charge.kv = stats
