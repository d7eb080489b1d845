"""The FLOP charge a finished request carries from the engine to the front end: its format, defined once.

The scheduler's accountant writes :func:`make_payload` under ``ec_transfer_params["flopwise"]``; the
server reads it here (:func:`take_payload`), removes it (so it is not echoed back in responses) and sums
it over the groups (n>1 parents) of one HTTP request (:class:`FlopTotals`).

A payload is a JSON-able dict: ``group``, ``requests`` (children settled so far), ``prompt``,
``completion``, ``total`` (both + ``extra``), ``dense_baseline``, ``components`` (the ledger's breakdown
of prompt + completion), ``engine`` / ``engine_total`` (data-parallel rank, all it computed), and when
they apply: ``kv`` (KV dropping's token counts), each ``extra`` part (e.g. ``prm``), each technique's
report (e.g. ``early_rejection``), ``budget`` and ``capped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flopwise.ledger import Breakdown

PAYLOAD_KEY = "flopwise"
USAGE_FIELDS = ("prompt", "completion", "total", "dense_baseline")


def merge_kv(stats: list[dict]) -> dict:
    """KV stats summed; the reasons nothing was dropped (where given), each once."""
    keys = dict.fromkeys(k for d in stats for k in d if k != "reason")
    merged = {k: sum(d.get(k, 0) for d in stats) for k in keys}
    reasons = dict.fromkeys(d["reason"] for d in stats if "reason" in d)
    if reasons:
        merged["reason"] = "; ".join(reasons)
    return merged


@dataclass
class Charge:
    """FLOPs charged: ``prompt`` = prefill forwards (and vision), ``completion`` = decode forwards; ``extra``:
    work outside the generator's forwards (e.g. ``prm``: reward-model passes), by name."""

    prompt: Breakdown = field(default_factory=Breakdown)
    completion: Breakdown = field(default_factory=Breakdown)
    dense_baseline: int = 0  # the same work with no flopwise technique on
    requests: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    kv: dict = field(default_factory=dict)  # KV dropping: prompt / kept / dropped tokens (+ a reason)

    @property
    def total(self) -> int:
        return self.prompt.total + self.completion.total + sum(self.extra.values())

    def merge(self, other: Charge) -> None:
        self.prompt += other.prompt
        self.completion += other.completion
        self.dense_baseline += other.dense_baseline
        self.requests += other.requests
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v
        if other.kv:
            self.kv = merge_kv([d for d in (self.kv, other.kv) if d])


def make_payload(
    group: str,
    charge: Charge,
    engine: int,
    engine_total: int,
    reports: dict[str, dict],
    budget: float | None = None,
    capped: bool = False,
) -> dict:
    out = {
        "group": group,
        "requests": charge.requests,
        "prompt": charge.prompt.total,
        "completion": charge.completion.total,
        "total": charge.total,
        "dense_baseline": charge.dense_baseline,
        "components": (charge.prompt + charge.completion).as_dict(),
        "engine": engine,
        "engine_total": engine_total,
        **charge.extra,
        **reports,
    }
    if charge.kv:
        out["kv"] = dict(charge.kv)
    if budget is not None:
        out.update(budget=budget, capped=capped)
    return out


def take_payload(output) -> dict | None:
    """Pop flopwise's payload off a ``RequestOutput``; drop the params dict if nothing else is in it."""
    params = getattr(output, "ec_transfer_params", None)
    if not params or PAYLOAD_KEY not in params:
        return None
    payload = params.pop(PAYLOAD_KEY)
    if not params:
        output.ec_transfer_params = None
    return payload


class FlopTotals:
    """Latest running total per group; the last child of a group to finish carries the whole group."""

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}

    def add(self, payload: dict) -> None:
        g = payload["group"]
        seen = self.groups.get(g)
        if seen is None or (payload["requests"], payload["total"]) >= (seen["requests"], seen["total"]):
            self.groups[g] = payload

    def __bool__(self) -> bool:
        return bool(self.groups)

    def usage(self) -> dict[str, float]:
        """``usage.flops``: prompt, completion, total and dense_baseline summed over groups (+ budget if set,
        + vision and language for image requests, + kv, attention and kv_scoring with KV dropping)."""
        usage = {k: sum(p[k] for p in self.groups.values()) for k in USAGE_FIELDS}
        vision = sum(p.get("components", {}).get("vision", 0) for p in self.groups.values())
        if vision:  # image requests: the vision tower's part and the language model's (PRM scoring excluded)
            usage["vision"] = vision
            usage["language"] = usage["prompt"] + usage["completion"] - vision
        kv = [p["kv"] for p in self.groups.values() if "kv" in p]
        if kv:  # KV dropping: what was kept, and the attention it left (scoring charged apart)
            usage["kv"] = merge_kv(kv)
            for part in ("attention", "kv_scoring"):
                usage[part] = sum(p.get("components", {}).get(part, 0) for p in self.groups.values())
        if any("prm" in p for p in self.groups.values()):
            usage["prm"] = sum(p.get("prm", 0) for p in self.groups.values())
        budgets = [p["budget"] for p in self.groups.values() if "budget" in p]
        if budgets:
            usage["budget"] = sum(budgets)
        return usage

    def early_rejection(self) -> dict | list[dict] | None:
        """Early-rejection stats: one dict for one group (one prompt), a list for several."""
        stats = [p["early_rejection"] for p in self.groups.values() if "early_rejection" in p]
        return (stats[0] if len(stats) == 1 else stats) or None

    @property
    def capped(self) -> bool:
        return any(p.get("capped") for p in self.groups.values())

    def engine_totals(self) -> dict[int, int]:
        """The latest running total of FLOPs computed per engine (data-parallel rank) these groups ran on."""
        totals: dict[int, int] = {}
        for p in self.groups.values():
            e = p.get("engine", 0)
            totals[e] = max(totals.get(e, 0), p.get("engine_total", 0))
        return totals
