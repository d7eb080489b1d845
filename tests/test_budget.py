"""The budget rules themselves: what a valid budget is, what admission needs, how a step is bounded."""

import math

import pytest

from flopwise.budget import BudgetError, admission_cost, check_admission, next_step_bound, parse_budget
from flopwise.hf.tiny import FAMILIES
from flopwise.ledger import FlopModel


@pytest.fixture(scope="module")
def model():
    return FlopModel.from_pretrained(FAMILIES["llama-gqa"])


@pytest.mark.parametrize(
    "value", [-1, 0, -0.0, math.nan, math.inf, -math.inf, "1e9", True, False, {"a": 1}, [1], None]
)
def test_bad_budgets_name_the_field(value):
    with pytest.raises(BudgetError, match="flop_budget"):
        parse_budget(value)


@pytest.mark.parametrize("value", [1, 2.5, 1e12, 10**15])
def test_good_budgets(value):
    assert parse_budget(value) == float(value)


def test_maximum_is_enforced():
    assert parse_budget(1e9, maximum=1e9) == 1e9
    with pytest.raises(BudgetError, match="maximum"):
        parse_budget(1e9 + 1, maximum=1e9)


def test_admission_gives_both_numbers(model):
    need = admission_cost(model, 40)
    assert need == model.request(40, 1).total
    check_admission(model, need, 40)
    with pytest.raises(BudgetError) as e:
        check_admission(model, need - 1, 40)
    assert f"{need - 1:,}" in str(e.value) and f"{need:,}" in str(e.value)


def test_step_bounds(model):
    # Decode: exactly one token against the whole context.
    assert next_step_bound(model, 57, 58) == model.forward(1, start=57, logits=1).total
    # Prefill: all remaining prompt tokens at once bounds any chunk of them.
    bound = next_step_bound(model, 100, 300)
    assert bound == model.forward(200, start=100, logits=1).total
    assert all(model.forward(n, start=100, logits=1).total <= bound for n in (1, 17, 128, 200))
