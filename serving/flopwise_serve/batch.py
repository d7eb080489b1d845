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

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Line:
    number: int  # 1-based line number in the input
    custom_id: str | None = None  # set for the first line with a given id only
    url: str | None = None
    body: dict | None = None
    error: str | None = None
    code: str = "invalid_line"

    @property
    def key(self) -> tuple[str, object]:
        """What marks this line done in the output: its custom_id, else its line number."""
        return ("id", self.custom_id) if self.custom_id is not None else ("line", self.number)


@dataclass
class Summary:
    done: int = 0
    errors: int = 0
    skipped: int = 0
    capped: int = 0
    charged: float = 0
    baseline: float = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, tuple[int, float]] = field(default_factory=dict)  # --ray: lines and FLOPs per replica
    up: float = 0.0  # when every engine was up and lines started to flow (epoch s)
    last_record: float = 0.0  # when the last served record was written (epoch s)
    served: int = 0  # lines that reached an engine (not the invalid ones)
    served_flops: float = 0

    def rate(self) -> tuple[float, float, float] | None:
        """(seconds, lines/s, FLOP/s) from the engines being up to the last served line; None if none was."""
        span = self.last_record - self.up
        if not (self.served and self.up and span > 0):
            return None
        return span, self.served / span, self.served_flops / span


def parse_input(path: Path) -> list[Line]:
    """Every non-blank input line, each either ready to run or carrying the reason it cannot be."""
    lines: list[Line] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            line = Line(number)
            lines.append(line)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                line.error = f"line {number} is not valid JSON: {e.msg}"
                continue
            if not isinstance(obj, dict):
                line.error = f"line {number} is not a JSON object"
                continue
            cid = obj.get("custom_id")
            if not (isinstance(cid, str) and cid):
                line.error = f"line {number}: custom_id must be a non-empty string"
                continue
            if cid in seen:
                line.error, line.code = f"line {number}: duplicate custom_id {cid!r} (only its first line is run)", "duplicate_custom_id"
                continue
            seen.add(cid)
            line.custom_id = cid
            if obj.get("method", "POST") != "POST":
                line.error = f"line {number}: method must be POST, got {obj.get('method')!r}"
            elif obj.get("url") not in URLS:
                line.error = f"line {number}: url must be one of {', '.join(URLS)}, got {obj.get('url')!r}"
            elif not isinstance(obj.get("body"), dict):
                line.error = f"line {number}: body must be a JSON object"
            elif obj["body"].get("stream"):
                line.error = f"line {number}: body.stream is not supported in a batch"
            else:
                line.url, line.body = obj["url"], obj["body"]
    return lines


def already_done(output: Path) -> set[tuple[str, object]]:
    """Keys (see :attr:`Line.key`) of the records already in the output.

    A torn last line (a run killed mid-write) and records of server-side failures (status 5xx: the line
    was never served) are removed from the file first, so that those lines are redone, not duplicated.
    """
    keys: set[tuple[str, object]] = set()
    if not output.exists():
        return keys
    kept, dropped = [], False
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data, dropped = data[: data.rfind(b"\n") + 1], True
    for raw in data.splitlines(keepends=True):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            dropped = True
            continue
        err = rec.get("error")
        if isinstance(err, dict) and (err.get("status_code") or 0) >= 500:
            dropped = True
            continue
        kept.append(raw)
        if rec.get("custom_id") is not None:
            keys.add(("id", rec["custom_id"]))
        elif isinstance(err, dict) and isinstance(err.get("line"), int):
            keys.add(("line", err["line"]))
    if dropped:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, output)
    return keys


def error_record(line: Line, code: str, message: str, status: int | None = None) -> dict:
    err = {"code": code, "message": message, "line": line.number}
    if status is not None:
        err["status_code"] = status
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None, "error": err}


class Writer:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


async def serve_line(line: Line, handlers: dict, model_name: str) -> dict:
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    body = dict(line.body)
    body.setdefault("model", model_name)
    chat = line.url == "/v1/chat/completions"
    try:
        request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_record(line, "invalid_request", f"body.{where}: {first.get('msg')}", 400)
    handler = handlers["chat" if chat else "completion"]
    try:
        if chat:
            response = await handler.create_chat_completion(request, None)
        else:
            response = await handler.create_completion(request, None)
    except Exception as e:  # one failing line never stops the batch
        return error_record(line, "internal_error", f"{type(e).__name__}: {e}", 500)
    if isinstance(response, ErrorResponse):
        err = response.error
        return error_record(line, err.type or "error", err.message, int(err.code))
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": line.custom_id,
        "response": {"status_code": 200, "request_id": response.id, "body": response.model_dump(mode="json")},
        "error": None,
    }


def _count(summary: Summary, record: dict, replica: str | None = None, served: bool = False) -> None:
    flops = (((record.get("response") or {}).get("body") or {}).get("usage") or {}).get("flops") or {}
    if served:
        summary.served += 1
        summary.served_flops += flops.get("total", 0)
        summary.last_record = time.time()
    if replica is not None:
        n, total = summary.replicas.get(replica, (0, 0.0))
        summary.replicas[replica] = (n + 1, total + flops.get("total", 0))
    if record.get("error"):
        summary.errors += 1
        code = record["error"].get("code", "error")
        summary.error_codes[code] = summary.error_codes.get(code, 0) + 1
        return
    summary.done += 1
    summary.charged += flops.get("total", 0)
    summary.baseline += flops.get("dense_baseline", 0)
    if any(c.get("stop_reason") == "flop_budget" for c in record["response"]["body"].get("choices", [])):
        summary.capped += 1


async def open_handlers(engine_client, args) -> tuple[dict, str]:
    """vLLM's chat and completion handlers over ``engine_client``, extended by flopwise as in ``flopwise serve``;
    and the served model name."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    from flopwise_vllm.serving import FlopChatMixin, FlopCompletionMixin, extend

    state = State()
    await init_app_state(engine_client, state, args, await engine_client.get_supported_tasks())
    handlers = {"chat": state.openai_serving_chat, "completion": state.openai_serving_completion}
    extend(handlers["chat"], FlopChatMixin)  # no-ops when the endpoint plugin already did it
    extend(handlers["completion"], FlopCompletionMixin)
    return handlers, state.openai_serving_models.model_name()


def engine_args(engine_argv: list[str]):
    """The argparse namespace vLLM's server builds from ``engine_argv``."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(engine_argv)


def start(lines: list[Line], output: Path) -> tuple[Summary, Writer, list[Line]]:
    """Skip what the output already holds, write the invalid lines' error records; return the lines to run."""
    summary = Summary()
    done = already_done(output)
    todo = [line for line in lines if line.key not in done]
    summary.skipped = len(lines) - len(todo)
    writer = Writer(output)
    runnable = []
    for line in todo:
        if line.error:
            record = error_record(line, line.code, line.error)
            writer.write(record)
            _count(summary, record)
        else:
            runnable.append(line)
    return summary, writer, runnable


async def run_lines(lines: list[Line], output: Path, engine_argv: list[str], concurrency: int) -> Summary:
    from tqdm import tqdm
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

    summary, writer, runnable = start(lines, output)
    bar = tqdm(total=len(runnable), desc="flopwise batch", unit="req", file=sys.stderr)
    try:
        if not runnable:
            return summary
        args = engine_args(engine_argv)
        async with build_async_engine_client(args) as engine_client:
            handlers, model_name = await open_handlers(engine_client, args)
            gate = asyncio.Semaphore(concurrency)
            summary.up = time.time()

            async def one(line: Line) -> None:
                async with gate:
                    record = await serve_line(line, handlers, model_name)
                writer.write(record)
                _count(summary, record, served=True)
                bar.update(1)

            await asyncio.gather(*(one(line) for line in runnable))
    finally:
        bar.close()
        writer.close()
    return summary


def run_batch(args, vllm_args: list[str]) -> int:
    from flopwise import hw
    from flopwise.models import ModelNotFound, resolve_model
    from flopwise_serve.cli import fail, serve_command

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
    argv, env = serve_command(model, vllm_args, default_budget=args.flop_budget)
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
        summary = asyncio.run(run_lines(lines, out, engine_argv, args.max_concurrency))
    else:
        if not args.ray:  # a Ray instance of this run's own: its servers listen on 127.0.0.1 only
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from flopwise_serve.ray_batch import RayBatchError, run_on_ray

        try:
            summary = run_on_ray(lines, out, engine_argv, env, args)
        except RayBatchError as e:
            return fail("batch", f"{e} (records finished so far are in {out}; rerun the same command to resume)")
    wall = time.monotonic() - t0
    print(f"flopwise batch: {summary.done} done, {summary.errors} errors, {summary.skipped} already in {out} "
          f"({wall:.1f}s on {hw.describe()})", file=sys.stderr)
    if summary.error_codes:
        print("  errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(summary.error_codes.items())), file=sys.stderr)
    for replica, (n, flops) in sorted(summary.replicas.items()):
        print(f"  replica {replica}: {n} lines, FLOPs charged {flops:.4g}", file=sys.stderr)
    rate = summary.rate()
    if rate is not None:
        print(f"  engines up after {summary.up - started:.1f}s; then {summary.served} lines in {rate[0]:.1f}s: "
              f"{rate[1]:.2f} lines/s, {rate[2]:.4g} FLOP/s", file=sys.stderr)
    print(f"  FLOPs charged {summary.charged:.4g}{' (all replicas)' if summary.replicas else ''}, dense baseline "
          f"{summary.baseline:.4g}, saved {summary.baseline - summary.charged:.4g}; {summary.capped} requests "
          "stopped by their FLOP budget", file=sys.stderr)
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
