"""The budget gate: before each step, stop every request whose next step might cross its group's budget.

Semantics in :mod:`flopwise.budget`. The bound of a step is the accountant's own cost model
(:meth:`~flopwise_vllm.accountant.Accountant.next_step_bound`: kept KV context, kept image tokens), plus
what a technique will charge with that step (``extra_bounds``, e.g. the scoring of a KV drop), so a
request is stopped only when its charge really could cross the budget, and the charge never does.
Siblings of one group share the budget: each one's bound is reserved before the next is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vllm.v1.request import Request

from flopwise_vllm.accountant import Accountant


class BudgetGate:
    def __init__(self, accountant: Accountant, extra_bounds: Iterable[Callable[[Request], int]] = ()):
        self.accountant = accountant
        self.extra_bounds = list(extra_bounds)

    def over_budget(self, requests: Iterable[Request]) -> list[Request]:
        """The requests to stop now (finish_reason ``length``, stop_reason ``flop_budget``); marks their
        groups capped."""
        acc = self.accountant
        if not acc.budgeted_groups:
            return []
        reserved: dict[int, int] = {}
        stop = []
        for request in requests:
            group = acc.group(request.request_id)
            budget = group.budget
            if budget is None or request.is_finished():
                continue
            bound = acc.next_step_bound(request) + sum(extra(request) for extra in self.extra_bounds)
            if budget.charged + reserved.get(id(group), 0) + bound > budget.budget:
                budget.capped = True
                stop.append(request)
            else:
                reserved[id(group)] = reserved.get(id(group), 0) + bound
        return stop
