"""Request options on the engine's paths: the server defaults, read once per process, and the checks that
every request passes, whatever endpoint brought it.

``flopwise serve`` hands its defaults to vLLM's processes as one JSON object in ``FLOPWISE_DEFAULTS``
(:class:`flopwise.options.Defaults`); :func:`server_defaults` reads it once. :func:`prepare` is called by
the platform's ``validate_request`` (every request of every endpoint, offline ``LLM`` included, before
it reaches the engine) and by the chat/completion front end (earlier, so that a streaming request is
refused before its stream starts): it validates the options, applies the defaults, checks admission
against the budget and writes the options back in their canonical ``extra_args`` form, which the engine
reads with :func:`engine_options` (no defaults again: they are in it already).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

from flopwise import options
from flopwise.budget import FIELD as BUDGET_FIELD
from flopwise.budget import BudgetError, check_admission
from flopwise.ledger import FlopModel, LedgerError
from flopwise.options import Defaults, RequestOptions
from flopwise.prm import PRMError, is_confidence, self_head
from flopwise.techniques import OptionError
from flopwise.techniques import early_rejection as er
from flopwise.techniques import kv_drop as kd
from flopwise.techniques import visual_drop as vd

DEFAULTS_ENV = "FLOPWISE_DEFAULTS"
_ledger: FlopModel | None = None  # the served model's, for admission (set where the model is known)
_kv_ok: bool | None = None  # whether this server's engine can drop KV (None: not known here)
_logprobs_mode: str | None = None  # what the engine's sampler returns as logprobs (None: not known here)
_worker_ok: bool | None = None  # whether the engine runs flopwise's CPU worker (None: not known here)


def server_defaults() -> Defaults:
    """This process's server defaults; a malformed ``FLOPWISE_DEFAULTS`` fails loudly, naming the field."""
    return _defaults(os.environ.get(DEFAULTS_ENV) or "")


@functools.cache
def _defaults(text: str) -> Defaults:  # parsed once per value, not once per request
    try:
        return options.defaults_from_json(text)
    except OptionError as e:
        raise RuntimeError(f"{DEFAULTS_ENV}: {e}") from None


def set_served(
    model: FlopModel | None,
    kv_ok: bool | None = None,
    logprobs_mode: str | None = None,
    worker_ok: bool | None = None,
) -> None:
    """The served model's ledger, for admission checks in this process (the front end's), whether its
    engine can drop KV (flopwise's worker and attention backend), its ``--logprobs-mode``, and whether it
    runs flopwise's CPU worker (``self:`` heads)."""
    global _ledger, _kv_ok, _logprobs_mode, _worker_ok
    _ledger, _kv_ok, _logprobs_mode, _worker_ok = model, kv_ok, logprobs_mode, worker_ok


def ledger() -> FlopModel | None:
    return _ledger


def prompt_len(engine_input) -> int | None:
    """Prompt tokens of a rendered request (None for inputs flopwise does not cost, e.g. embeddings)."""
    if not isinstance(engine_input, dict):
        return None
    ids = engine_input.get("prompt_token_ids")
    if ids is None and isinstance(engine_input.get("decoder"), dict):  # encoder-decoder inputs
        ids = engine_input["decoder"].get("prompt_token_ids")
    return None if ids is None else len(ids)


def image_tokens(engine_input, model: FlopModel, keep: float) -> list[int]:
    """LM tokens behind each image of a rendered request, for admission. LLaVA projects only the kept
    tokens: its placeholders. Anyres LLaVA: one token, the least (some placeholders are row newlines the
    projector does not make, how many depends on the image's size, and the engine's validator sees no
    ``visual_keep``). Qwen2-VL's tower runs on the whole grid, which the front end no longer sees (the
    pixels went to the processor cache): the fewest tokens that ``keep`` leaves at that many placeholders.
    So admission never refuses what fits; the engine's per-step gate bounds the rest."""
    if not isinstance(engine_input, dict) or engine_input.get("type") != "multimodal":
        return []
    places = engine_input.get("mm_placeholders", {}).get("image", [])
    v = model.spec.vision
    if v is not None and v.min_crops:
        return [1 for _ in places]
    if v is None or v.kind != "qwen2_vl":
        return [p.length for p in places]
    return [vd.tokens_before(p.length, keep) for p in places]


def admit(opts: RequestOptions, model: FlopModel | None, engine_input, field: str = BUDGET_FIELD) -> None:
    """Refuse (OptionError naming ``field``) a request whose prefill alone cannot fit its budget."""
    prompt = prompt_len(engine_input)
    if opts.flop_budget is None or model is None or prompt is None:
        return
    keep, after = (opts.visual.keep, opts.visual.layer) if opts.visual is not None else (1.0, None)
    try:
        check_admission(model, opts.flop_budget, prompt, image_tokens(engine_input, model, keep), after)
    except (BudgetError, LedgerError) as e:
        raise OptionError(str(e), field) from None


def prepare(
    extra: Mapping | None,
    n: int | None,
    engine_inputs: Sequence = (),
    paths: Mapping[str, str] | None = None,
    model: FlopModel | None = None,
) -> tuple[RequestOptions, dict | None]:
    """Validate ``extra`` (a request's flopwise options, flat) with the server defaults applied, and check
    admission of each rendered input against the budget (with ``model``'s ledger, else the one set for this
    process); -> (options, ``extra`` with the options in canonical form: the new ``extra_args``).
    Raises OptionError."""
    extra = dict(extra or {})
    defaults = server_defaults()
    opts = options.parse(extra, defaults, n=n, paths=paths)
    if opts.kv is not None and _kv_ok is False:
        where = next((p for f, p in (paths or {}).items() if f in kd.FIELDS and f in extra), kd.POLICY_FIELD)
        model = model or _ledger
        why = (
            f"{model.spec.architecture} uses a sliding window"
            if model is not None and model.spec.windowed
            else "this engine does not run flopwise's KV worker and attention backend (CPU only), or its KV "
            "cache is quantized"
        )
        raise OptionError(f"{where}: KV dropping is not available here: {why}", where)
    rejection = opts.early_rejection
    if (
        rejection is not None
        and is_confidence(rejection.prm)
        and _logprobs_mode not in (None, "raw_logprobs")
    ):
        where = (paths or {}).get(er.FIELD, er.FIELD) + ".prm"
        raise OptionError(
            f"{where}: {rejection.prm!r} reads the model's raw log-probabilities, but this engine's sampler "
            f"returns {_logprobs_mode} (--logprobs-mode); use a PRM or serve with raw_logprobs",
            where,
        )
    if rejection is not None and self_head.is_self(rejection.prm):
        _check_self_head(rejection.prm, model or _ledger, (paths or {}).get(er.FIELD, er.FIELD) + ".prm")
    for engine_input in engine_inputs:
        admit(opts, model or _ledger, engine_input, (paths or {}).get(BUDGET_FIELD, BUDGET_FIELD))
    rest = {k: v for k, v in extra.items() if k not in options.FIELDS}
    canonical = opts.as_extra()
    if opts.kv is None and (defaults.kv_keep is not None or defaults.kv_keep_tokens is not None):
        canonical[kd.KEEP_FIELD] = 1.0  # turned off by the request: stays off when checked again (idempotent)
    return opts, {**rest, **canonical} or None


def _check_self_head(name: str, model: FlopModel | None, where: str) -> None:
    """A ``self:`` head needs flopwise's worker and the model it was fitted on."""
    if _worker_ok is False:
        raise OptionError(
            f"{where}: {name!r} is computed by flopwise's CPU worker, which this engine does not run "
            "(--worker-cls)",
            where,
        )
    if model is not None:
        try:
            self_head.check_fits(name, model.spec.architecture, model.spec.hidden)
        except PRMError as e:
            raise OptionError(str(e).replace("early_rejection.prm", where, 1), where) from None


def engine_options(extra: Mapping | None) -> RequestOptions:
    """A request's options in the engine, from the canonical ``extra_args`` :func:`prepare` wrote."""
    return options.parse(extra or {}, options.NO_DEFAULTS)
