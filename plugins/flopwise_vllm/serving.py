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
import os
from contextvars import ContextVar
from http import HTTPStatus

from flopwise.budget import FIELD, BudgetError, check_admission, parse_budget
from flopwise.ledger import FlopModel, LedgerError
from flopwise.prm import PRMError
from flopwise.techniques import OptionError
from flopwise.techniques import early_rejection as er
from flopwise.techniques import kv_drop as kd
from flopwise.techniques import visual_drop as vd
from flopwise_vllm import metrics
from flopwise_vllm.payload import FlopTotals, take_payload
from flopwise_vllm.platform import max_budget

logger = logging.getLogger("flopwise")
DEFAULT_BUDGET_ENV = "FLOPWISE_DEFAULT_FLOP_BUDGET"
DEFAULT_REJECTION_ENV = "FLOPWISE_EARLY_REJECTION"  # JSON object: the server's default early_rejection
DEFAULT_PRM_ENV = "FLOPWISE_PRM"  # the server's default early_rejection.prm
# Set by flopwise serve when it adds --trust-request-mm-kwargs itself (so that visual_keep reaches the
# processor): per-request mm_processor_kwargs other than flopwise's stay refused, as stock vLLM refuses them.
MM_KWARGS_GATE_ENV = "FLOPWISE_MM_KWARGS_GATE"
_UNSET = object()
# Set while one HTTP request is handled: it has n>1 candidates, which must all run on one engine.
_ONE_ENGINE: ContextVar[bool] = ContextVar("flopwise_one_engine", default=False)
_next_rank = itertools.count()


class FlopTap:
    """Passes engine outputs through untouched except for taking flopwise's payload off them."""

    def __init__(self, source, rank: bool = False):
        self.source = source
        self.totals = FlopTotals()
        self.rank = rank  # non-streaming: drop rejected candidates, best final score first
        self.rejected_tokens = 0  # tokens of dropped candidates: generated, so still in usage.completion_tokens
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
    return handler.create_error_response(message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param=param)


def rejection_config(request) -> er.EarlyRejectionConfig | None:
    """The request's early_rejection (else the server default for n>1 requests); raises ValueError naming the field."""
    raw = (request.model_extra or {}).get(er.FIELD)
    explicit = raw is not None
    if not explicit:
        default = os.environ.get(DEFAULT_REJECTION_ENV)
        if not default or (request.n or 1) < 2:
            return None
        raw = json.loads(default)
    if isinstance(raw, dict) and "prm" not in raw and os.environ.get(DEFAULT_PRM_ENV):
        raw = {**raw, "prm": os.environ[DEFAULT_PRM_ENV]}
    config = er.parse_config(raw)  # its ConfigError carries (message, field) like the errors below
    if (request.n or 1) < 2:
        raise ValueError(f"{er.FIELD} needs n > 1 candidates to choose from, got n={request.n or 1}", "n")
    if config.mode == "beam":
        raise ValueError(f"{er.FIELD}.mode='beam' (forking survivors) is not implemented in the engine yet; "
                         "use 'reject'", f"{er.FIELD}.mode")
    if getattr(request, "use_beam_search", False):
        raise ValueError(f"{er.FIELD} cannot be combined with use_beam_search", er.FIELD)
    from flopwise.prm import resolve

    try:
        resolve(config.prm)
    except PRMError as e:
        raise ValueError(str(e), f"{er.FIELD}.prm") from None
    return config


def image_tokens(engine_input, whole_grid: bool, keep: float) -> list[int]:
    """LM tokens behind each image of a rendered request, for admission. LLaVA projects only the kept
    tokens: its placeholders. Qwen2-VL's tower runs on the whole grid, which the front end no longer sees
    (the pixels went to the processor cache): the fewest tokens that ``keep`` leaves at that many
    placeholders, so admission never refuses what fits; the engine's per-step gate bounds the rest."""
    if not isinstance(engine_input, dict) or engine_input.get("type") != "multimodal":
        return []
    places = engine_input.get("mm_placeholders", {}).get("image", [])
    if not whole_grid:
        return [p.length for p in places]
    return [vd.tokens_before(p.length, keep) for p in places]


def _find(fields, sources) -> dict[str, tuple[str, object]]:
    """Where each of ``fields`` is first set among ``sources`` ((path prefix, dict), in order): (path, value)."""
    found = {}
    for name in fields:
        for prefix, source in sources:
            if source.get(name) is not None:
                found.setdefault(name, (prefix + name, source[name]))
    return found


def _parse(parse, fields, found):
    """``parse`` the ``found`` values in ``fields`` order; its OptionError becomes ValueError(message, path)."""
    try:
        return parse(*(found.get(name, (None, None))[1] for name in fields))
    except OptionError as e:
        raise ValueError(str(e), found.get(e.field, (e.field,))[0]) from None


def visual_options(request) -> vd.VisualDropConfig | None:
    """Move ``visual_keep`` / ``visual_drop`` / ``visual_drop_layer`` (top level, or in ``vllm_xargs``) into
    ``mm_processor_kwargs``, validated; raises ValueError(message, field)."""
    xargs = dict(request.vllm_xargs or {})
    mm = dict(getattr(request, "mm_processor_kwargs", None) or {})
    found = _find(vd.FIELDS, (("", request.model_extra or {}), ("vllm_xargs.", xargs), ("mm_processor_kwargs.", mm)))
    others = sorted(set(mm) - set(vd.FIELDS))
    if others and os.environ.get(MM_KWARGS_GATE_ENV):
        raise ValueError(f"per-request mm_processor_kwargs {others} are disabled on this server (start it with "
                         f"--trust-request-mm-kwargs to allow them); {', '.join(vd.FIELDS)} are accepted",
                         "mm_processor_kwargs")
    if not found:
        return None
    config = _parse(vd.parse_options, vd.FIELDS, found)
    for name in vd.FIELDS:
        xargs.pop(name, None)
    request.vllm_xargs = xargs or None
    request.mm_processor_kwargs = {**mm, vd.KEEP_FIELD: config.keep, vd.METHOD_FIELD: config.method}
    if config.layer is not None:
        request.mm_processor_kwargs[vd.LAYER_FIELD] = config.layer
    return config


def kv_options(request, flop_model: FlopModel) -> kd.KVDropConfig | None:
    """Validate ``kv_policy`` / ``kv_keep`` / ``kv_keep_tokens`` (top level, or in ``vllm_xargs``) and forward
    them in ``vllm_xargs``; raises ValueError(message, field). None: no KV dropping asked for."""
    xargs = dict(request.vllm_xargs or {})
    found = _find(kd.FIELDS, (("", request.model_extra or {}), ("vllm_xargs.", xargs)))
    if not found:
        return None
    config = _parse(kd.parse_options, kd.FIELDS, found)
    if config.active and flop_model.spec.windowed:
        where = found.get(kd.KEEP_FIELD, found.get(kd.TOKENS_FIELD, found.get(kd.POLICY_FIELD)))[0]
        raise ValueError(f"{where}: KV dropping needs full attention; {flop_model.spec.architecture} "
                         "uses a sliding window", where)
    for name in kd.FIELDS:
        xargs.pop(name, None)
    request.vllm_xargs = {**xargs, **config.as_extra()}
    return config


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

    def _apply_visual(self, request):
        """Before rendering: ``visual_keep`` / ``visual_drop`` into ``mm_processor_kwargs``; an error or None."""
        try:
            config = visual_options(request)
        except ValueError as e:
            return _bad_request(self, e.args[0], e.args[1])
        if config is not None and self._flop_model().spec.vision is None:
            return _bad_request(self, f"{vd.KEEP_FIELD}: {self._flop_model().spec.architecture} takes no images",
                                vd.KEEP_FIELD)
        return None

    def _apply_options(self, request, engine_inputs):
        """Validate ``flop_budget``, ``early_rejection`` and the KV options and forward them in ``vllm_xargs``;
        an error or None."""
        try:
            config = rejection_config(request)
            kv_options(request, self._flop_model())
        except ValueError as e:
            return _bad_request(self, e.args[0], e.args[1])
        if config is not None:
            request.vllm_xargs = {**(request.vllm_xargs or {}), er.FIELD: config.model_dump_json()}
        _ONE_ENGINE.set((getattr(request, "n", None) or 1) > 1)
        return self._apply_budget(request, engine_inputs)

    def _get_data_parallel_rank(self, raw_request):
        """With data parallelism, vLLM places each of a request's n candidates on any engine; flopwise pins
        them to one (round robin over requests), whose scheduler holds their shared budget, ledger group and
        early-rejection scores. A rank from the router's ``X-data-parallel-rank`` header is kept."""
        rank = super()._get_data_parallel_rank(raw_request)
        size = self.engine_client.vllm_config.parallel_config.data_parallel_size
        if rank is None and size > 1 and _ONE_ENGINE.get():
            rank = next(_next_rank) % size
        return rank

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
            whole_grid = model.spec.vision is not None and model.spec.vision.kind == "qwen2_vl"
            mm = getattr(request, "mm_processor_kwargs", None) or {}
            visual = vd.parse_options(mm.get(vd.KEEP_FIELD), layer=mm.get(vd.LAYER_FIELD))
            after = visual.layer if visual.active else None
            for engine_input in engine_inputs:
                images = image_tokens(engine_input, whole_grid, visual.keep)
                check_admission(model, budget, self._extract_prompt_len(engine_input), images, after)
        except (BudgetError, LedgerError) as e:
            metrics.refused()
            return _bad_request(self, str(e), FIELD)
        xargs[FIELD] = budget
        request.vllm_xargs = xargs
        return None


class FlopChatMixin(BudgetMixin):
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


class FlopCompletionMixin(BudgetMixin):
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
