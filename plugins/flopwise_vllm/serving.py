"""flopwise additions to vLLM's OpenAI chat and completion handlers: ``flop_budget``, ``usage.flops``, metrics.

The handlers vLLM builds are re-classed (in :mod:`flopwise_vllm.endpoint`) to subclasses that mix in
the classes below, so every vLLM feature (streaming, tools, n>1, logprobs) stays vLLM's own. The mixins
validate the budget after vLLM renders the prompt (so a refusal is a 400 even for streaming requests),
tap the stream of engine outputs, and add one field to the usage object.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus

from flopwise.budget import FIELD, BudgetError, check_admission, parse_budget
from flopwise.ledger import FlopModel, LedgerError
from flopwise_vllm import metrics
from flopwise_vllm.payload import FlopTotals, take_payload
from flopwise_vllm.platform import max_budget

logger = logging.getLogger("flopwise")
DEFAULT_BUDGET_ENV = "FLOPWISE_DEFAULT_FLOP_BUDGET"
_UNSET = object()


class FlopTap:
    """Passes engine outputs through untouched except for taking flopwise's payload off them."""

    def __init__(self, source):
        self.source = source
        self.totals = FlopTotals()
        self._reported = False

    async def _run(self):
        async for item in self.source:
            output = item[1] if isinstance(item, tuple) else item  # completions yield (prompt_idx, output)
            self.observe(output)
            yield item

    def __aiter__(self):
        return self._run()

    def observe(self, output) -> None:
        payload = take_payload(output)
        if payload is not None:
            self.totals.add(payload)

    def usage(self) -> dict[str, int] | None:
        """``usage.flops`` for this HTTP request, counted into the metrics once."""
        if not self.totals:
            logger.warning("no FLOP charge came back from the engine: is the flopwise scheduler active?")
            return None
        usage = self.totals.usage()
        if not self._reported:
            self._reported = True
            metrics.observe(usage, self.totals.engine_total(), capped=self.totals.capped)
            logger.debug("flopwise: groups=%s budget=%s charged=%d saved=%d capped=%s", list(self.totals.groups),
                         usage.get("budget"), usage["total"], usage["dense_baseline"] - usage["total"], self.totals.capped)
        return usage

    def patch_usage_chunk(self, chunk: str) -> str:
        """Add ``flops`` to the final streaming usage chunk (``"choices": []``); pass others through."""
        if not chunk.startswith("data: {") or '"usage"' not in chunk:
            return chunk
        body = json.loads(chunk[len("data: "):])
        if body.get("choices") or not body.get("usage"):
            return chunk
        flops = self.usage()
        if flops is None:
            return chunk
        body["usage"]["flops"] = flops
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _set_flops(response, tap: FlopTap):
    usage = getattr(response, "usage", None)
    if usage is not None:
        flops = tap.usage()
        if flops is not None:
            usage.flops = flops  # UsageInfo allows extra fields; they are serialised with the response
    return response


class BudgetMixin:
    """Validates ``flop_budget`` and refuses what cannot fit, before any response (or stream) starts.

    The budget comes from the top-level ``flop_budget`` field, else ``vllm_xargs["flop_budget"]``, else
    the server's ``--default-flop-budget``; it is forwarded to the engine in ``vllm_xargs``.
    """

    def _flop_model(self) -> FlopModel:
        model = self.__dict__.get("_flopwise_model")
        if model is None:
            model = self.__dict__["_flopwise_model"] = FlopModel.from_pretrained(self.model_config.hf_config.to_dict())
        return model

    def _apply_budget(self, request, engine_inputs):
        xargs = dict(request.vllm_xargs or {})
        raw = (request.model_extra or {}).get(FIELD, _UNSET)
        if raw is _UNSET or raw is None:
            raw = xargs.get(FIELD, _UNSET)
        if raw is _UNSET:
            default = os.environ.get(DEFAULT_BUDGET_ENV)
            if not default:
                return None
            raw = float(default)
        try:
            budget = parse_budget(raw, max_budget())
            model = self._flop_model()
            for engine_input in engine_inputs:
                check_admission(model, budget, self._extract_prompt_len(engine_input))
        except (BudgetError, LedgerError) as e:
            metrics.refused()
            return self.create_error_response(str(e), err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param=FIELD)
        xargs[FIELD] = budget
        request.vllm_xargs = xargs
        return None


class FlopChatMixin(BudgetMixin):
    """Mixed in front of ``OpenAIServingChat``."""

    async def render_chat_request(self, request):
        result = await super().render_chat_request(request)
        if isinstance(result, tuple):
            error = self._apply_budget(request, result[1])
            if error is not None:
                return error
        return result

    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        tap = FlopTap(result_generator)
        response = await super().chat_completion_full_generator(request, tap, *args, **kwargs)
        return _set_flops(response, tap)

    async def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        tap = FlopTap(result_generator)
        async for chunk in super().chat_completion_stream_generator(request, tap, *args, **kwargs):
            yield tap.patch_usage_chunk(chunk)
        tap.usage()  # count the request in the metrics even when the client asked for no usage


class FlopCompletionMixin(BudgetMixin):
    """Mixed in front of ``OpenAIServingCompletion``."""

    async def render_completion_request(self, request):
        result = await super().render_completion_request(request)
        if isinstance(result, list):
            error = self._apply_budget(request, result)
            if error is not None:
                return error
        return result

    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        tap = FlopTap(None)
        for output in final_res_batch:
            tap.observe(output)
        response = super().request_output_to_completion_response(final_res_batch, *args, **kwargs)
        return _set_flops(response, tap)

    async def completion_stream_generator(self, request, engine_inputs, result_generator, *args, **kwargs):
        tap = FlopTap(result_generator)
        async for chunk in super().completion_stream_generator(request, engine_inputs, tap, *args, **kwargs):
            yield tap.patch_usage_chunk(chunk)
        tap.usage()


_classes: dict[tuple[type, type], type] = {}


def extend(handler, mixin: type) -> None:
    """Re-class one vLLM handler instance to a subclass with ``mixin`` in front (no new state, no copy)."""
    base = type(handler)
    if issubclass(base, mixin):
        return
    cls = _classes.get((mixin, base))
    if cls is None:
        cls = _classes[(mixin, base)] = type(f"Flopwise{base.__name__}", (mixin, base), {})
    handler.__class__ = cls
