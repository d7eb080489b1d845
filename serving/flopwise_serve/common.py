"""What the command modules share: the error contract (one line naming the problem, exit code 2) and
argument types that check a value as a request's field would be checked, importing nothing heavy."""

from __future__ import annotations

import argparse
import sys

PROG = "flopwise"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def say(command: str, message: str) -> None:
    """A progress line on stderr, named like the command's errors."""
    print(f"{PROG} {command}: {message}", file=sys.stderr, flush=True)


def fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def human(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f} FLOP"


def flop_amount(text: str) -> float:
    """A positive, finite number of FLOPs (``1e12`` style accepted)."""
    from flopwise.budget import BudgetError, parse_budget

    try:
        return parse_budget(float(text), field="value")
    except (ValueError, BudgetError):
        raise argparse.ArgumentTypeError(f"must be a positive number of FLOPs, got {text!r}") from None


def keep_ratio(text: str) -> float:
    from flopwise.techniques.visual_drop import VisualDropError, parse_options

    try:
        return parse_options(float(text)).keep
    except VisualDropError as e:  # a ValueError too: catch it first
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"visual_keep must be a number in (0, 1], got {text!r}") from None


def visual_method(text: str) -> str:
    """A ``visual_drop`` method name; checked only when given, so building the parser imports no torch."""
    from flopwise.techniques.visual_drop import method_names

    if text not in method_names():
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(method_names())})"
        )
    return text
