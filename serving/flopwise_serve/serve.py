"""``flopwise serve [MODEL] [options] [vLLM serve options]``: vLLM's OpenAI server with flopwise wired in.

flopwise's flags become the server's :class:`flopwise.options.Defaults`, checked as a request's fields would
be; every other option goes to vLLM unchanged (:mod:`flopwise_serve.vllm_args` tells MODEL from an
option's value). The command execs vLLM's server in the same process, so its PID is the server's.
"""

from __future__ import annotations

import argparse
import os
import sys

from flopwise import hw
from flopwise.ledger import FlopModel, LedgerError
from flopwise_serve.common import fail, flop_amount, keep_ratio, non_negative_int, positive_int, visual_method
from flopwise_serve.launch import VLLM_ENTRY


def _has_flag(argv: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def serve_command(
    model: str, vllm_args: list[str], host: str = "127.0.0.1", port: int = 8000, defaults=None
) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment ``flopwise serve`` runs; ``defaults``: the server's
    :class:`flopwise.options.Defaults`, handed to vLLM's processes as one JSON object."""
    from flopwise.budget import Policy
    from flopwise.options import Defaults
    from flopwise_vllm import PLUGIN_NAMES, SCHEDULER_CLS
    from flopwise_vllm.options import DEFAULTS_ENV

    defaults = defaults or Defaults()
    argv = [sys.executable, "-m", VLLM_ENTRY, "--model", model, "--host", host, "--port", str(port)]
    if not _has_flag(vllm_args, "--scheduler-cls"):
        argv += ["--scheduler-cls", SCHEDULER_CLS]
    if defaults.budget_policy is Policy.SMALLEST_BUDGET and not _has_flag(vllm_args, "--scheduling-policy"):
        # the scheduler sets each request's priority from its budget
        argv += [
            "--scheduling-policy",
            "priority",
        ]
    if not _has_flag(vllm_args, "--dtype"):
        argv += ["--dtype", hw.default_dtype()]
    if not _has_flag(vllm_args, "--enforce-eager", "--no-enforce-eager"):
        argv += ["--enforce-eager"]  # compile warm-up takes minutes on small CPUs
    # Per-request visual_keep travels in mm_processor_kwargs, which vLLM refuses unless trusted; flopwise
    # trusts it and gates the other keys itself, unless the operator passed the flag (then vLLM's rules).
    if not _has_flag(vllm_args, "--trust-request-mm-kwargs"):
        argv += ["--trust-request-mm-kwargs"]
        defaults = defaults.model_copy(update={"mm_kwargs_gate": True})
    argv += vllm_args
    env = hw.engine_env()
    # Endpoint plugins load only when named in VLLM_PLUGINS, which then also allow-lists general plugins.
    named = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(named + list(PLUGIN_NAMES)))
    env[DEFAULTS_ENV] = defaults.model_dump_json(exclude_defaults=True)
    return argv, env


def server_defaults(args):
    """The ``flopwise serve`` flags as :class:`flopwise.options.Defaults`, each checked as a request's field
    would be; raises ValueError naming the flag."""
    import json

    from pydantic import ValidationError

    from flopwise.options import Defaults
    from flopwise.techniques import OptionError

    flags = {
        "flop_budget": "--default-flop-budget",
        "max_flop_budget": "--max-flop-budget",
        "early_rejection": "--early-rejection",
        "prm": "--prm",
    }
    fields = {
        "flop_budget": args.default_flop_budget,
        "max_flop_budget": args.max_flop_budget,
        "budget_policy": args.budget_policy,
        "prm": args.prm,
        "visual_keep": args.visual_keep,
        "visual_drop": args.visual_drop,
        "visual_drop_layer": args.visual_drop_layer,
        "kv_policy": args.kv_policy,
        "kv_keep": args.kv_keep,
        "kv_keep_tokens": args.kv_keep_tokens,
    }
    if args.early_rejection is not None:
        try:
            fields["early_rejection"] = json.loads(args.early_rejection)
        except json.JSONDecodeError as e:
            raise ValueError(f"--early-rejection: not valid JSON: {e.msg}") from None
        if not isinstance(fields["early_rejection"], dict):
            raise ValueError("--early-rejection: must be a JSON object")
    try:
        return Defaults(**{k: v for k, v in fields.items() if v is not None}).checked()
    except OptionError as e:
        name = e.field.split(".")[0]
        message = str(e).removeprefix("early_rejection.")  # the flag already says which object
        raise ValueError(f"{flags.get(name, '--' + name.replace('_', '-'))}: {message}") from None
    except ValidationError as e:  # a field's type (argparse has checked most already)
        err = e.errors()[0]
        name = str(err["loc"][0])
        raise ValueError(f"{flags.get(name, '--' + name.replace('_', '-'))}: {err['msg']}") from None


def cmd_serve(args, rest: list[str]) -> int:
    from flopwise.models import ModelNotFound, resolve_model
    from flopwise_serve.vllm_args import VllmArgsError, split_positional

    try:
        positional, vllm_args = split_positional(rest, "serve")
        if len(positional) > 1:
            raise VllmArgsError(f"unrecognized arguments: {' '.join(positional[1:])}")
        model = resolve_model(positional[0] if positional else None)
        FlopModel.from_pretrained(model)  # an architecture the ledger cannot cost is refused up front
        defaults = server_defaults(args)
    except (LedgerError, ModelNotFound, ValueError, VllmArgsError) as e:
        return fail("serve", str(e))
    argv, env = serve_command(model, vllm_args, args.host, args.port, defaults)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # same PID: whoever started `flopwise serve` can stop the server
    return 0


def _budget_args(parser: argparse.ArgumentParser) -> None:
    from flopwise.budget import Policy

    parser.add_argument(
        "--default-flop-budget", type=flop_amount, default=None, help="budget for requests that set none"
    )
    parser.add_argument(
        "--max-flop-budget", type=flop_amount, default=None, help="refuse requests asking for more (HTTP 400)"
    )
    parser.add_argument(
        "--budget-policy",
        choices=[x.value for x in Policy],
        default=Policy.FIFO.value,
        help="admission order: vLLM's FIFO, or smallest budget first so small requests do not queue behind "
        "huge ones",
    )


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with flopwise on; other options go to vLLM",
        description="Any option not listed here is passed to vLLM's server unchanged.",
    )
    parser.usage = "flopwise serve [MODEL] [options] [vLLM serve options]"
    parser.description += " MODEL: a model dir (default: the embedded SmolLM2-135M-Instruct)."
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=positive_int, default=8000)
    _budget_args(parser)
    parser.add_argument(
        "--early-rejection",
        default=None,
        metavar="JSON",
        help='default early_rejection for n>1 requests, e.g. \'{"every_tokens": 32, "keep": 0.5}\'',
    )
    parser.add_argument(
        "--prm",
        default=None,
        help="default PRM for early rejection (verifier:arithmetic, head:chain-sum, or a dir)",
    )
    parser.add_argument(
        "--visual-keep",
        type=keep_ratio,
        default=None,
        help="VLMs: fraction of each image's tokens the LM sees, for requests that set no visual_keep",
    )
    parser.add_argument(
        "--visual-drop",
        type=visual_method,
        default=None,
        help="VLMs: how image tokens are chosen: visiondrop (default), cls_attention, uniform, random",
    )
    parser.add_argument(
        "--visual-drop-layer",
        type=non_negative_int,
        default=None,
        help="LLaVA: drop inside the vision tower after this many layers (default: after the tower)",
    )
    parser.add_argument(
        "--kv-policy",
        default=None,
        help="KV dropping policy for requests that set none: snapkv (default), tova, h2o, streaming_llm, "
        "knorm, random",
    )
    parser.add_argument(
        "--kv-keep",
        type=float,
        default=None,
        help="fraction of each prompt's KV kept after prefill, for requests that set no kv_keep",
    )
    parser.add_argument(
        "--kv-keep-tokens",
        type=positive_int,
        default=None,
        help="token budget for each request's KV instead of --kv-keep: the prompt is cut to it and "
        "generation evicts its oldest blocks beyond it",
    )
    parser.set_defaults(run=cmd_serve, passes_through=True)
