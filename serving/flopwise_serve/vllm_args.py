"""vLLM's options as vLLM parses them, so ``flopwise serve [MODEL] [vLLM options]`` and ``flopwise batch``
can tell a positional argument from an option's value.

flopwise's own parser leaves every vLLM option to vLLM, so it cannot know that ``--max-model-len`` takes a
value and ``--enforce-eager`` does not; without that, ``flopwise serve --max-model-len 2048`` would read
``2048`` as the model. :func:`split_positional` walks the leftover arguments with vLLM's own option table
(its serve parser, or its engine arguments for batch).
"""

from __future__ import annotations

import argparse
import functools


class VllmArgsError(ValueError):
    pass


@functools.cache
def _actions(kind: str) -> dict[str, argparse.Action]:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if kind == "serve":
        from vllm.entrypoints.launchers.cli_args import make_arg_parser

        parser = make_arg_parser(FlexibleArgumentParser())
    else:
        from vllm.engine.arg_utils import AsyncEngineArgs

        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return dict(parser._option_string_actions)


def _takes(action: argparse.Action) -> str:
    """How many values an option consumes: 'none', 'one', 'optional' or 'many'."""
    if action.nargs == 0 or isinstance(
        action,
        (
            argparse._StoreTrueAction,
            argparse._StoreFalseAction,
            argparse._StoreConstAction,
            argparse._CountAction,
            argparse.BooleanOptionalAction,
        ),
    ):
        return "none"
    if action.nargs in (None, 1) or isinstance(action.nargs, int):
        return "one"
    return "optional" if action.nargs == "?" else "many"


def split_positional(args: list[str], kind: str = "serve") -> tuple[list[str], list[str]]:
    """-> (positional arguments, the rest in order) of ``args``, the arguments flopwise's own parser left."""
    if not any(a.startswith("-") and a != "-" for a in args):  # no option at all: no need for vLLM's table
        return list(args), []
    actions = _actions(kind)
    positional, rest = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            positional += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        rest.append(arg)
        name = arg.split("=", 1)[0]
        if "=" in arg:
            continue
        action = actions.get(name) or actions.get(name.replace("_", "-"))
        if action is None:
            raise VllmArgsError(f"unrecognized argument {arg!r} (neither a flopwise nor a vLLM option)")
        takes = _takes(action)
        if takes == "one":
            if i >= len(args):
                raise VllmArgsError(f"argument {arg}: expected a value")
            rest.append(args[i])
            i += 1
        elif takes in ("optional", "many"):
            while i < len(args) and not (
                args[i].startswith("-") and len(args[i]) > 1 and not _number(args[i])
            ):
                rest.append(args[i])
                i += 1
                if takes == "optional":
                    break
    return positional, rest


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
