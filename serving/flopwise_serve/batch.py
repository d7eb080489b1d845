"""``flopwise batch INPUT.jsonl -o OUTPUT.jsonl``: offline generation in the OpenAI Batch API format.

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body"}``. Each output line is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}`` or, when the line could not be served, ``{"id", "custom_id", "response": null, "error":
{"code", "message", "line"}}``.

Bodies are produced by vLLM's own chat and completion handlers, extended by flopwise exactly as in
``flopwise serve`` (``usage.flops``, ``flop_budget`` validation), in-process. Lines are written and
flushed as they finish; a rerun with the same output file skips what is already there, so an
interrupted batch resumes without duplicates. Bad lines become error records and never stop the batch;
a line the server failed on (status 5xx) is recorded too, and redone by the next run.
"""

import asyncio
import os
import sys
import time
from pathlib import Path

from flopwise_serve.batch_records import already_done, parse_input  # noqa: F401 (the command's own API)


def add_parser(sub) -> None:
    from flopwise_serve.common import flop_amount, positive_float, positive_int

    parser = sub.add_parser(
        "batch",
        help="offline generation over an OpenAI Batch API .jsonl file (resumable)",
        usage="flopwise batch INPUT -o OUTPUT [options] [vLLM engine options]",
        description="INPUT: a .jsonl of custom_id, method, url (/v1/chat/completions or "
        "/v1/completions), body. Any option not listed here is passed to the vLLM engine unchanged.",
    )
    parser.add_argument(
        "-o", "--output", required=True, help="output .jsonl; rerunning with the same file resumes"
    )
    parser.add_argument(
        "--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--flop-budget", type=flop_amount, default=None, help="FLOP budget for lines that set none"
    )
    parser.add_argument(
        "--max-concurrency", type=positive_int, default=256, help="requests in flight at once (without --ray)"
    )
    ray = parser.add_argument_group("Ray (pip install 'flopwise[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: HOST:PORT of its head, 'auto', or nothing for a new local instance",
    )
    ray.add_argument(
        "--replicas", type=positive_int, default=None, help="vLLM engines on the cluster (default 1)"
    )
    ray.add_argument(
        "--cpus-per-replica", type=positive_float, default=None, help="CPUs each engine holds (default 1)"
    )
    ray.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="lines per Ray task: a lost replica's unfinished tasks are redone (default 32)",
    )
    ray.add_argument(
        "--concurrent-batches",
        type=positive_int,
        default=None,
        help="tasks in flight per replica (default 4): batch size x this = requests its engine batches",
    )
    parser.set_defaults(run=cmd_batch, passes_through=True)


def cmd_batch(args, rest: list[str]) -> int:
    """Find INPUT among the arguments by vLLM's own option table, then run the batch."""
    from flopwise_serve.common import fail
    from flopwise_serve.vllm_args import VllmArgsError, split_positional

    try:
        positional, rest = split_positional(rest, "engine")
    except VllmArgsError as e:
        return fail("batch", str(e))
    if len(positional) != 1:
        return fail(
            "batch",
            "give one INPUT file"
            if not positional
            else f"unrecognized arguments: {' '.join(positional[1:])}",
        )
    args.input = positional[0]
    return run_batch(args, rest)


def run_batch(args, vllm_args: list[str]) -> int:
    from flopwise import hw
    from flopwise.models import ModelNotFound, resolve_model
    from flopwise_serve.common import fail
    from flopwise_serve.serve import serve_command

    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        return fail("batch", f"input file {args.input!r} does not exist")
    if src.resolve() == out.resolve():
        return fail("batch", "--output must differ from the input file")
    try:
        model = resolve_model(args.model)
    except ModelNotFound as e:
        return fail("batch", str(e))

    # Same engine, plugins and environment as `flopwise serve`, in this process.
    from flopwise.options import Defaults

    argv, env = serve_command(model, vllm_args, defaults=Defaults(flop_budget=args.flop_budget))
    os.environ.update(env)
    engine_argv = _drop_flag_values(argv[3:], ("--host", "--port"))

    ray_flags = ("replicas", "cpus_per_replica", "batch_size", "concurrent_batches")
    if args.ray is None:
        given = [f"--{f.replace('_', '-')}" for f in ray_flags if getattr(args, f) is not None]
        if given:
            return fail("batch", f"{', '.join(given)} only apply with --ray")
    else:
        for flag, default in zip(ray_flags, (1, 1.0, 32, 4)):
            if getattr(args, flag) is None:
                setattr(args, flag, default)

    lines = parse_input(src)
    t0, started = time.monotonic(), time.time()
    if args.ray is None:
        from flopwise_serve.batch_engine import run_lines

        summary = asyncio.run(run_lines(lines, out, engine_argv, args.max_concurrency))
    else:
        if not args.ray:  # a Ray instance of this run's own: its servers listen on 127.0.0.1 only
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from flopwise_serve.ray_batch import RayBatchError, run_on_ray

        try:
            summary = run_on_ray(lines, out, engine_argv, env, args)
        except RayBatchError as e:
            return fail(
                "batch", f"{e} (records finished so far are in {out}; rerun the same command to resume)"
            )
    wall = time.monotonic() - t0
    print(
        f"flopwise batch: {summary.done} done, {summary.errors} errors, {summary.skipped} already in {out} "
        f"({wall:.1f}s on {hw.describe()})",
        file=sys.stderr,
    )
    if summary.error_codes:
        print(
            "  errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary.error_codes.items())),
            file=sys.stderr,
        )
    for replica, (n, flops) in sorted(summary.replicas.items()):
        print(f"  replica {replica}: {n} lines, FLOPs charged {flops:.4g}", file=sys.stderr)
    rate = summary.rate()
    if rate is not None:
        print(
            f"  engines up after {summary.up - started:.1f}s; then {summary.served} lines in {rate[0]:.1f}s: "
            f"{rate[1]:.2f} lines/s, {rate[2]:.4g} FLOP/s",
            file=sys.stderr,
        )
    print(
        f"  FLOPs charged {summary.charged:.4g}{' (all replicas)' if summary.replicas else ''}, dense "
        "baseline "
        f"{summary.baseline:.4g}, saved {summary.baseline - summary.charged:.4g}; {summary.capped} requests "
        "stopped by their FLOP budget",
        file=sys.stderr,
    )
    if summary.errors:  # the records say why; a rerun redoes only the lines the server failed on
        print(
            f"flopwise batch: {summary.errors} of {summary.errors + summary.done} lines failed (see their "
            "error "
            f"records in {out})",
            file=sys.stderr,
        )
        return 1
    return 0


def _drop_flag_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        out.append(a)
    return out
