"""flopwise additions to vLLM's OpenAI chat and completion handlers: ``flop_budget``, ``early_rejection``,
``visual_keep`` / ``visual_drop``, ``kv_policy`` / ``kv_keep`` / ``kv_keep_tokens``, ``usage.flops``, metrics.

The handlers vLLM builds are re-classed (in :mod:`flopwise_vllm.endpoint`) to subclasses that mix in
the classes below, so every vLLM feature (streaming, tools, n>1, logprobs) stays vLLM's own. The mixins
validate the request options after vLLM renders the prompt (so a refusal is a 400 even for streaming
requests), tap the stream of engine outputs, and add fields to the response: ``usage.flops`` and, for
early rejection, ``early_rejection`` stats. A non-streaming early-rejection response lists only the
candidates that were not rejected, best final PRM score first.
"""

from __future__ import annotations

import itertools
import json
import logging
from contextvars import ContextVar
from http import HTTPStatus

from flopwise.budget import FIELD as BUDGET_FIELD
from flopwise.options import FIELDS, parse
from flopwise.techniques import OptionError
from flopwise.techniques import early_rejection as er
from flopwise.techniques import visual_drop as vd
from flopwise_vllm import VISUAL_MODELS, metrics, options
from flopwise_vllm.payload import FlopTotals, take_payload

logger = logging.getLogger("flopwise")
# Set while one HTTP request is handled: it has n>1 candidates, which must all run on one engine.
_ONE_ENGINE: ContextVar[bool] = ContextVar("flopwise_one_engine", default=False)
_next_rank = itertools.count()


class FlopTap:
    """Passes engine outputs through untouched except for taking flopwise's payload off them."""

    def __init__(self, source, rank: bool = False):
        self.source = source
        self.totals = FlopTotals()
        self.rank = rank  # non-streaming: drop rejected candidates, best final score first
        self.rejected_tokens = (
            0  # tokens of dropped candidates: generated, so still in usage.completion_tokens
        )
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
            if self.rank and "early_rejection" in payload:
                self.rejected_tokens += rank_candidates(output, payload["early_rejection"])

    def usage(self) -> dict[str, int] | None:
        """``usage.flops`` for this HTTP request, counted into the metrics once."""
        if not self.totals:
            logger.warning("no FLOP charge came back from the engine: is the flopwise scheduler active?")
            return None
        usage = self.totals.usage()
        if not self._reported:
            self._reported = True
            metrics.observe(usage, self.totals.engine_totals(), capped=self.totals.capped)
            logger.debug(
                "flopwise: groups=%s budget=%s charged=%d saved=%d capped=%s",
                list(self.totals.groups),
                usage.get("budget"),
                usage["total"],
                usage["dense_baseline"] - usage["total"],
                self.totals.capped,
            )
        return usage

    def patch_usage_chunk(self, chunk: str) -> str:
        """Add ``flops`` to the final streaming usage chunk (``"choices": []``); pass others through."""
        if not chunk.startswith("data: {") or '"usage"' not in chunk:
            return chunk
        body = json.loads(chunk[len("data: ") :])
        if body.get("choices") or not body.get("usage"):
            return chunk
        flops = self.usage()
        if flops is None:
            return chunk
        body["usage"]["flops"] = flops
        stats = self.totals.early_rejection()
        if stats is not None:
            body["early_rejection"] = stats
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def rank_candidates(output, stats: dict) -> int:
    """Keep the candidates early rejection did not stop, best final PRM score first, re-indexed from 0;
    return how many tokens the dropped ones had generated."""
    scores = stats.get("scores", {})
    kept = [c for c in output.outputs if c.stop_reason != er.STOP_REASON]
    dropped = sum(len(c.token_ids) for c in output.outputs if c.stop_reason == er.STOP_REASON)
    kept.sort(key=lambda c: (-scores.get(str(c.index), float("-inf")), c.index))
    for i, c in enumerate(kept):
        c.index = i
    output.outputs = kept
    return dropped


def _set_flops(response, tap: FlopTap):
    usage = getattr(response, "usage", None)
    if usage is not None:
        flops = tap.usage()
        if flops is not None:
            usage.flops = flops  # UsageInfo allows extra fields; they are serialised with the response
        usage.completion_tokens += tap.rejected_tokens
        usage.total_tokens += tap.rejected_tokens
    stats = tap.totals.early_rejection()
    if stats is not None:
        response.early_rejection = stats  # the response models allow extra fields too
    return response


def _bad_request(handler, message: str, param: str):
    return handler.create_error_response(
        message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param=param
    )


def collect(request) -> tuple[dict, dict[str, str]]:
    """A request's flopwise options, flat, from where each is first set: the top level, then ``vllm_xargs``,
    then (visual ones) ``mm_processor_kwargs``; and each one's path there, for errors."""
    sources = (
        ("", request.model_extra or {}),
        ("vllm_xargs.", request.vllm_xargs or {}),
        ("mm_processor_kwargs.", getattr(request, "mm_processor_kwargs", None) or {}),
    )
    raw, paths = {}, {}
    for name in FIELDS:
        for prefix, source in sources:
            if source.get(name) is not None and (prefix != "mm_processor_kwargs." or name in vd.FIELDS):
                raw[name], paths[name] = source[name], prefix + name
                break
    return raw, paths


class OptionsMixin:
    """Validates the flopwise options of a chat or completion request and refuses what cannot fit its budget,
    before any response (or stream) starts, with :func:`flopwise_vllm.options.prepare`: the function the
    platform's request validator applies to every request of every endpoint. Options move to where the
    engine reads them: visual ones into ``mm_processor_kwargs`` (before rendering: the processor needs
    them), the others into ``vllm_xargs``."""

    def _apply_visual(self, request):
        """Before rendering: ``visual_*`` into ``mm_processor_kwargs``; an error or None."""
        mm = dict(getattr(request, "mm_processor_kwargs", None) or {})
        others = sorted(set(mm) - set(vd.FIELDS))
        if others and options.server_defaults().mm_kwargs_gate:
            return _bad_request(
                self,
                f"per-request mm_processor_kwargs {others} are disabled on this server (start "
                f"it with --trust-request-mm-kwargs to allow them); {', '.join(vd.FIELDS)} are "
                "accepted",
                "mm_processor_kwargs",
            )
        raw, paths = collect(request)
        visual = {k: v for k, v in raw.items() if k in vd.FIELDS}
        if not visual:
            return None
        try:
            opts = parse(visual, options.server_defaults(), paths=paths)
        except OptionError as e:
            return _bad_request(self, str(e), e.field)
        model = options.ledger()
        if model is not None and model.spec.vision is None:
            return _bad_request(
                self, f"{vd.KEEP_FIELD}: {model.spec.architecture} takes no images", vd.KEEP_FIELD
            )
        arch = getattr(getattr(self, "model_config", None), "architecture", None)
        if opts.visual is not None and opts.visual.active and arch is not None and arch not in VISUAL_MODELS:
            return _bad_request(
                self,
                f"{vd.KEEP_FIELD}: flopwise cannot drop the image tokens of {arch} (it can for "
                f"{', '.join(sorted(VISUAL_MODELS))})",
                vd.KEEP_FIELD,
            )
        xargs = {k: v for k, v in (request.vllm_xargs or {}).items() if k not in vd.FIELDS}
        request.vllm_xargs = xargs or None
        request.mm_processor_kwargs = {
            **{k: v for k, v in mm.items() if k not in vd.FIELDS},
            **opts.mm_kwargs(),
        }
        if opts.visual is None:  # keep 1 asked for explicitly: say so, or the processor applies the default
            request.mm_processor_kwargs[vd.KEEP_FIELD] = 1.0
        return None

    def _apply_options(self, request, engine_inputs):
        """After rendering: validate, apply the defaults, check admission, forward in ``vllm_xargs``; an error
        or None."""
        raw, paths = collect(request)
        n = getattr(request, "n", None) or 1
        try:
            if raw.get(er.FIELD) is not None and getattr(request, "use_beam_search", False):
                raise OptionError(f"{er.FIELD} cannot be combined with use_beam_search", er.FIELD)
            opts, extra = options.prepare({**(request.vllm_xargs or {}), **raw}, n, engine_inputs, paths)
        except OptionError as e:
            if e.field.endswith(BUDGET_FIELD):
                metrics.refused()
            return _bad_request(self, str(e), e.field)
        request.vllm_xargs = extra
        _ONE_ENGINE.set(n > 1)
        return None

    def _get_data_parallel_rank(self, raw_request):
        """With data parallelism, vLLM places each of a request's n candidates on any engine; flopwise pins
        them to one (round robin over requests), whose scheduler holds their shared budget, ledger group and
        early-rejection scores. A rank from the router's ``X-data-parallel-rank`` header is kept."""
        rank = super()._get_data_parallel_rank(raw_request)
        size = self.engine_client.vllm_config.parallel_config.data_parallel_size
        if rank is None and size > 1 and _ONE_ENGINE.get():
            rank = next(_next_rank) % size
        return rank


class FlopChatMixin(OptionsMixin):
    """Mixed in front of ``OpenAIServingChat``."""

    async def render_chat_request(self, request):
        error = self._apply_visual(request)
        if error is not None:
            return error
        result = await super().render_chat_request(request)
        if isinstance(result, tuple):
            error = self._apply_options(request, result[1])
            if error is not None:
                return error
        return result

    async def chat_completion_full_generator(self, request, result_generator, *args, **kwargs):
        tap = FlopTap(result_generator, rank=True)
        response = await super().chat_completion_full_generator(request, tap, *args, **kwargs)
        return _set_flops(response, tap)

    async def chat_completion_stream_generator(self, request, result_generator, *args, **kwargs):
        tap = FlopTap(result_generator)
        async for chunk in super().chat_completion_stream_generator(request, tap, *args, **kwargs):
            yield tap.patch_usage_chunk(chunk)
        tap.usage()  # count the request in the metrics even when the client asked for no usage


class FlopCompletionMixin(OptionsMixin):
    """Mixed in front of ``OpenAIServingCompletion``."""

    async def render_completion_request(self, request):
        error = self._apply_visual(request)
        if error is not None:
            return error
        result = await super().render_completion_request(request)
        if isinstance(result, list):
            error = self._apply_options(request, result)
            if error is not None:
                return error
        return result

    def request_output_to_completion_response(self, final_res_batch, *args, **kwargs):
        tap = FlopTap(None, rank=True)
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
