"""One model of a request's flopwise options, parsed by one function on every path.

The HTTP front end, the platform's request validator (plain ``vllm serve`` + ``vllm_xargs``), the
scheduler, ``flopwise batch`` and the offline API all call :func:`parse`, so the same request gets the
same answer everywhere: the same options, or the same :class:`~flopwise.techniques.OptionError` (message +
the field's path, what an HTTP 400 names).

A request's options arrive flat, under these names (top-level JSON fields, ``vllm_xargs`` entries or
``SamplingParams.extra_args`` keys): ``flop_budget``, ``early_rejection`` (an object, or its JSON text in
``vllm_xargs``), ``kv_policy`` / ``kv_keep`` / ``kv_keep_tokens`` and ``visual_keep`` / ``visual_drop`` /
``visual_drop_layer``. What a request leaves unset comes from the server's :class:`Defaults`, which the
caller passes in: nothing here reads the environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flopwise.budget import FIELD as BUDGET_FIELD
from flopwise.budget import BudgetError, Policy, parse_budget
from flopwise.techniques import OptionError
from flopwise.techniques import early_rejection as er
from flopwise.techniques import kv_drop as kd
from flopwise.techniques import visual_drop as vd

FIELDS = (BUDGET_FIELD, er.FIELD, er.SIZE_FIELD, *kd.FIELDS, *vd.FIELDS)


class Defaults(BaseModel):
    """The server's defaults (``flopwise serve`` flags), applied to requests that leave a field unset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flop_budget: float | None = Field(None, gt=0, description="Budget of requests that set none.")
    max_flop_budget: float | None = Field(None, gt=0, description="Requests asking for more are refused.")
    budget_policy: Policy = Field(Policy.FIFO, description="Admission order of waiting requests.")
    early_rejection: dict | None = Field(None, description="early_rejection of n>1 requests that set none.")
    prm: str | None = Field(None, description="PRM of an early_rejection object that names none.")
    # The technique defaults are checked by checked(), with the validators a request's fields go through.
    visual_keep: float | None = Field(None, description="visual_keep of requests that set none, in (0, 1].")
    visual_drop: str | None = Field(None, description="visual_drop method of requests that set none.")
    visual_drop_layer: int | None = Field(None, description="visual_drop_layer of requests that set none.")
    kv_policy: str | None = Field(None, description="kv_policy of requests that set none.")
    kv_keep: float | None = Field(None, description="kv_keep of requests that set no KV budget, in (0, 1].")
    kv_keep_tokens: int | None = Field(None, description="kv_keep_tokens of requests that set no KV budget.")
    mm_kwargs_gate: bool = Field(
        False,
        description="Refuse per-request mm_processor_kwargs other than flopwise's "
        "(set when flopwise serve trusts them only so that visual_keep gets through).",
    )

    def checked(self) -> Defaults:
        """Raise :class:`OptionError` (field = the flag's name) if a default would be refused in a request."""
        for name, value in (("flop_budget", self.flop_budget), ("max_flop_budget", self.max_flop_budget)):
            if value is not None:
                _budget(value, None, name, name)
        if self.flop_budget and self.max_flop_budget and self.flop_budget > self.max_flop_budget:
            raise OptionError(
                f"the default flop_budget {self.flop_budget:g} exceeds the maximum {self.max_flop_budget:g}",
                "flop_budget",
            )
        parse({}, self, n=2 if self.early_rejection is not None else 1)
        if self.prm is not None:  # also when no early_rejection default names it yet
            from flopwise.prm import PRMError, resolve

            try:
                resolve(self.prm)
            except PRMError as e:
                raise OptionError(str(e), "prm") from None
        return self


NO_DEFAULTS = Defaults()


class RequestOptions(BaseModel):
    """A request's flopwise options, validated, defaults applied. A technique that is off is None."""

    model_config = ConfigDict(frozen=True)

    flop_budget: float | None = None
    early_rejection: er.EarlyRejectionConfig | None = None
    # the client request's n, with early_rejection: the engine sees its children arrive one by one
    candidates: int | None = None
    kv: kd.KVDropConfig | None = None
    visual: vd.VisualDropConfig | None = None

    def as_extra(self) -> dict:
        """The options as ``SamplingParams.extra_args`` entries (what the engine parses back). Visual dropping
        travels in ``mm_processor_kwargs`` instead (:meth:`mm_kwargs`): the processor needs it."""
        extra: dict = {}
        if self.flop_budget is not None:
            extra[BUDGET_FIELD] = self.flop_budget
        if self.early_rejection is not None:
            extra[er.FIELD] = self.early_rejection.model_dump_json()
            if self.candidates is not None:
                extra[er.SIZE_FIELD] = self.candidates
        if self.kv is not None:
            extra.update(self.kv.as_extra())
        return extra

    def mm_kwargs(self) -> dict:
        if self.visual is None:
            return {}
        out = {vd.KEEP_FIELD: self.visual.keep, vd.METHOD_FIELD: self.visual.method}
        if self.visual.layer is not None:
            out[vd.LAYER_FIELD] = self.visual.layer
        return out


def _budget(value, maximum: float | None, field: str, name: str = BUDGET_FIELD) -> float:
    try:
        return parse_budget(value, maximum, field=name)
    except BudgetError as e:
        raise OptionError(str(e), field) from None


def _rejection(raw, defaults: Defaults, n: int | None, path) -> er.EarlyRejectionConfig | None:
    where = path(er.FIELD)
    if raw is None:
        if defaults.early_rejection is None or n is None or n < 2:
            return (
                None  # the server default applies to n>1 requests only (the engine sees it already applied)
            )
        raw = defaults.early_rejection
    elif isinstance(raw, str):  # vllm_xargs carries it as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise OptionError(f"{er.FIELD} is not valid JSON: {e.msg}", where) from None
    if isinstance(raw, dict) and "prm" not in raw and defaults.prm:
        raw = {**raw, "prm": defaults.prm}
    try:
        config = er.parse_config(raw)
    except er.ConfigError as e:  # the message names the field; the error's field is where it came from
        raise OptionError(str(e), where + e.field[len(er.FIELD) :]) from None
    if n is not None and n < 2:
        raise OptionError(f"{er.FIELD} needs n > 1 candidates to choose from, got n={n}", "n")
    if config.mode == "beam":
        raise OptionError(
            f"{er.FIELD}.mode='beam' (forking survivors) is not implemented in the engine yet; use 'reject'",
            f"{where}.mode",
        )
    from flopwise.prm import PRMError, resolve

    try:
        resolve(config.prm)
    except PRMError as e:
        raise OptionError(str(e), f"{where}.prm") from None
    return config


def _kv(raw: Mapping, defaults: Defaults, path) -> kd.KVDropConfig | None:
    policy, keep, tokens = (raw.get(f) for f in kd.FIELDS)
    if policy is None:
        policy = defaults.kv_policy
    if keep is None and tokens is None:  # a request's own keep or budget replaces both defaults
        keep, tokens = defaults.kv_keep, defaults.kv_keep_tokens
    try:
        config = kd.parse_options(policy, keep, tokens)
    except kd.KVDropError as e:
        raise OptionError(str(e), path(e.field)) from None
    return config if config.active else None


def _visual(raw: Mapping, defaults: Defaults, path) -> vd.VisualDropConfig | None:
    keep, method, layer = (raw.get(f) for f in vd.FIELDS)
    keep = defaults.visual_keep if keep is None else keep
    method = defaults.visual_drop if method is None else method
    layer = defaults.visual_drop_layer if layer is None else layer
    try:
        config = vd.parse_options(keep, method, layer)
    except vd.VisualDropError as e:
        raise OptionError(str(e), path(e.field)) from None
    return config if config.active else None


def parse(
    raw: Mapping,
    defaults: Defaults = NO_DEFAULTS,
    *,
    n: int | None = None,
    paths: Mapping[str, str] | None = None,
) -> RequestOptions:
    """Validate a request's flat options ``raw`` (see the module docstring), unset fields from ``defaults``.

    ``n``: the request's candidates (early rejection needs n > 1; None: not known, as in the engine, where
    the children of an n>1 request arrive one by one). ``paths``: where each field came from (e.g.
    ``vllm_xargs.kv_keep``), for the error's field. Raises :class:`OptionError`.
    """
    paths = paths or {}

    def path(name: str) -> str:
        return paths.get(name, name)

    budget = raw.get(BUDGET_FIELD)
    if budget is None:
        budget = defaults.flop_budget
    rejection = _rejection(raw.get(er.FIELD), defaults, n, path)
    size = n if n is not None else raw.get(er.SIZE_FIELD)  # the front end writes it; the engine reads it
    return RequestOptions(
        flop_budget=None if budget is None else _budget(budget, defaults.max_flop_budget, path(BUDGET_FIELD)),
        early_rejection=rejection,
        candidates=size if rejection is not None and isinstance(size, int) and size > 1 else None,
        kv=_kv(raw, defaults, path),
        visual=_visual(raw, defaults, path),
    )


def defaults_from_json(text: str | None) -> Defaults:
    """The defaults ``flopwise serve`` hands its engine processes as JSON; a malformed one raises
    OptionError."""
    if not text:
        return NO_DEFAULTS
    try:
        return Defaults.model_validate_json(text).checked()
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(map(str, err["loc"])) or "defaults"
        raise OptionError(f"server default {field}: {err['msg']} (got {err.get('input')!r})", field) from None
