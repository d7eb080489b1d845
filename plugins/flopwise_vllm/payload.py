"""The FLOP charge a finished request carries from the engine to the front end.

The scheduler writes it under ``ec_transfer_params["flopwise"]``; the server reads it here, removes it
(so it is not echoed back in responses) and sums it over the groups (n>1 parents) of one HTTP request.
"""

from __future__ import annotations

PAYLOAD_KEY = "flopwise"
USAGE_FIELDS = ("prompt", "completion", "total", "dense_baseline")


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
            usage["kv"] = {k: sum(d[k] for d in kv) for k in kv[0]}
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
