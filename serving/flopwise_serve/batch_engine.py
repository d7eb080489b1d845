"""``flopwise batch`` lines served in-process by vLLM's own chat and completion handlers, extended by
flopwise exactly as in ``flopwise serve``."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from flopwise_serve.batch_records import Line, Summary, count, error_record, start


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


async def open_handlers(engine_client, args) -> tuple[dict, str]:
    """vLLM's chat and completion handlers over ``engine_client``, extended by flopwise as in ``flopwise
    serve``; and the served model name."""
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
                count(summary, record, served=True)
                bar.update(1)

            await asyncio.gather(*(one(line) for line in runnable))
    finally:
        bar.close()
        writer.close()
    return summary
