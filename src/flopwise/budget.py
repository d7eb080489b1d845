"""Per-request FLOP budgets: what a valid budget is, what admission needs, how the engine gates steps.

Engine-agnostic: the vLLM scheduler, the server and the batch runner all call these functions, so a
budget means the same thing on every path.

Semantics. A budget caps the FLOPs charged to one request (all n candidates together). Admission
refuses a request whose prefill alone (one forward over the whole prompt, no prefix-cache credit)
exceeds it. In the engine, each request's next step is gated by the most that step can cost: a decode
step costs exactly one token against its context; a prefill step at most all the remaining prompt
tokens at once (a smaller chunk costs less), plus the encoder runs of images it has not reached yet. A step
that might cross the budget is
not run: the request finishes with finish_reason ``length`` and stop_reason ``flop_budget``. So the
charge never exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from flopwise.ledger import FlopModel

FIELD = "flop_budget"
STOP_REASON = "flop_budget"


class BudgetError(ValueError):
    """A bad or unaffordable budget; the message names the ``flop_budget`` field."""


def parse_budget(value, maximum: float | None = None, field: str = FIELD) -> float:
    """A positive, finite number of FLOPs (no bool, string or object), at most ``maximum`` if set."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{field} must be a number of FLOPs, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"{field} must be a positive finite number of FLOPs, got {value!r}")
    if maximum is not None and value > maximum:
        raise BudgetError(f"{field}={value:,.0f} exceeds the server's maximum of {maximum:,.0f} FLOPs")
    return float(value)


def admission_cost(
    model: FlopModel,
    prompt_tokens: int,
    image_tokens: Sequence[int] = (),
    kept_after_layer: int | None = None,
) -> int:
    """The least a request can cost: its prefill with one row of logits, plus one vision-tower run per
    image (``image_tokens``: the LM tokens each image's tower + projector produce; ``kept_after_layer``:
    they were dropped to that many inside the tower, see :meth:`FlopModel.vision`)."""
    vision = sum(
        model.vision(1, tokens_per_image=t, kept_after_layer=kept_after_layer).total for t in image_tokens
    )
    return model.forward(prompt_tokens, start=0, logits=1).total + vision


def check_admission(
    model: FlopModel,
    budget: float,
    prompt_tokens: int,
    image_tokens: Sequence[int] = (),
    kept_after_layer: int | None = None,
) -> None:
    need = admission_cost(model, prompt_tokens, image_tokens, kept_after_layer)
    if need > budget:
        images = f" and {len(image_tokens)} image(s)" if image_tokens else ""
        raise BudgetError(
            f"{FIELD}={budget:,.0f} FLOPs cannot cover this request's prefill of {prompt_tokens} "
            f"tokens{images}, "
            f"which needs {need:,} FLOPs"
        )


def next_step_bound(model: FlopModel, num_computed: int, num_tokens: int) -> int:
    """Most the next forward of a request can cost, given ``num_computed`` of its ``num_tokens`` done.

    In prefill, all remaining prompt tokens at once (cost grows with chunk size); in decode, one token.
    """
    remaining = max(1, num_tokens - num_computed)
    return model.forward(remaining, start=num_computed, logits=1).total


class Policy(str, Enum):
    """Order in which waiting requests are admitted to the running batch."""

    FIFO = "fifo"  # vLLM's own order
    SMALLEST_BUDGET = (
        "smallest-budget"  # smallest remaining budget first: small requests do not queue behind huge ones
    )


@dataclass
class BudgetState:
    """A budget shared by one request's candidates; ``charged`` is what the ledger has charged so far."""

    budget: float
    charged: int = 0
    capped: bool = False
