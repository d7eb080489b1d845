"""``verifier:arithmetic``: an exact step verifier for the arithmetic a step writes down.

Every ``=`` in a line whose two sides are arithmetic expressions (numbers, + - * / x and parentheses;
surrounding words are ignored) is checked: a step scores 1.0 if it holds at least one such equation
and all hold, 0.0 if any fails, ``None`` if it has none. It is the oracle PRM for reasoning-gym's
arithmetic tasks: no weights, no FLOPs, and it never judges a correct step wrong.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from flopwise.prm.base import ProcessRewardModel

_LEADING = re.compile(r"^[\s\d.+\-*/×x÷()]+")
_TRAILING = re.compile(r"[\s\d.+\-*/×x÷()]+$")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> float | None:
    """The value of a plain arithmetic expression, or ``None`` if it is not one."""
    text = expression.strip().rstrip(".").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])", "*", text)
    if not text or not re.search(r"\d", text):
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None

    def ev(node) -> float:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not arithmetic")

    try:
        return float(ev(tree))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def check_line(line: str) -> float | None:
    """1.0 / 0.0 / ``None``: all equations in ``line`` hold / one fails / there is none."""
    parts = line.split("=")
    checked = False
    for left, right in zip(parts, parts[1:]):
        lm, rm = _TRAILING.search(left), _LEADING.search(right)
        lv = evaluate(lm.group(0)) if lm else None
        rv = evaluate(rm.group(0)) if rm else None
        if lv is None or rv is None:
            continue
        if not math.isclose(lv, rv, rel_tol=1e-9, abs_tol=1e-9):
            return 0.0
        checked = True
    return 1.0 if checked else None


class ArithmeticVerifier(ProcessRewardModel):
    name = "verifier:arithmetic"

    def score_steps(self, prompt: str, steps: list[str], key: str | None = None) -> list[float | None]:
        return [check_line(s) for s in steps]
