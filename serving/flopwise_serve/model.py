"""``flopwise model``: prepare the embedded default model (SmolLM2-135M-Instruct) and print its directory."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("model", help="prepare the embedded default model and print its directory")
    parser.set_defaults(run=lambda args, rest: cmd_model(args))


def cmd_model(args) -> int:
    from flopwise.models import ModelNotFound, default_model_path
    from flopwise_serve.common import fail

    try:
        print(default_model_path())
    except ModelNotFound as e:
        return fail("model", str(e))
    return 0
