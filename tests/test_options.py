"""The one request-options model: validation, defaults, errors naming the field where it came from."""

import json

import pytest

from flopwise.options import NO_DEFAULTS, Defaults, defaults_from_json, parse
from flopwise.techniques import OptionError


@pytest.mark.parametrize(
    "raw,n,field,needle",
    [
        ({"flop_budget": -1}, 1, "flop_budget", "positive finite"),
        ({"flop_budget": "1e9"}, 1, "flop_budget", "must be a number"),
        ({"flop_budget": True}, 1, "flop_budget", "must be a number"),
        ({"early_rejection": {"keep": 2}}, 4, "early_rejection.keep", "early_rejection.keep"),
        (
            {"early_rejection": '{"keep": 2}'},
            4,
            "early_rejection.keep",
            "early_rejection.keep",
        ),  # JSON text (xargs)
        ({"early_rejection": "{nope"}, 4, "early_rejection", "not valid JSON"),
        ({"early_rejection": {"mode": "beam"}}, 4, "early_rejection.mode", "not implemented"),
        ({"early_rejection": {}}, 1, "n", "n > 1"),
        ({"early_rejection": {"prm": "verifier:nope"}}, 4, "early_rejection.prm", "verifier:nope"),
        ({"early_rejection": {"prm": "confidence:mean"}}, 4, "early_rejection.prm", "confidence scorer"),
        ({"early_rejection": {"prm": "self:nope"}}, 4, "early_rejection.prm", "not a self head"),
        ({"early_rejection": {"prm": "self:"}}, 4, "early_rejection.prm", "self:chain-sum"),
        ({"early_rejection": {"threshold": 1.5}}, 4, "early_rejection.threshold", "less than or equal to 1"),
        ({"early_rejection": {"threshold": -0.1}}, 4, "early_rejection.threshold", "greater than or equal"),
        ({"early_rejection": {"margin": -0.1}}, 4, "early_rejection.margin", "greater than or equal to 0"),
        ({"early_rejection": {"percentile": 0}}, 4, "early_rejection.percentile", "greater than 0"),
        ({"early_rejection": {"percentile": 100}}, 4, "early_rejection.percentile", "less than 100"),
        ({"early_rejection": {"confidence_top_k": 21}}, 4, "early_rejection.confidence_top_k", "20"),
        ({"early_rejection": {"accept": 1.5}}, 4, "early_rejection.accept", "less than or equal to 1"),
        ({"early_rejection": {"width": 0}}, 4, "early_rejection.width", "greater than or equal to 1"),
        ({"early_rejection": {"width": 2, "keep": 0.5}}, 4, "early_rejection.width", "not keep"),
        ({"kv_keep": 1.5}, 1, "kv_keep", "(0, 1]"),
        ({"kv_policy": "lru", "kv_keep": 0.5}, 1, "kv_policy", "unknown kv_policy"),
        ({"kv_keep": 0.5, "kv_keep_tokens": 200}, 1, "kv_keep_tokens", "not both"),
        ({"visual_keep": 0}, 1, "visual_keep", "(0, 1]"),
        ({"visual_drop": "nope"}, 1, "visual_drop", "unknown visual_drop"),
    ],
)
def test_bad_options_name_the_field_and_its_path(raw, n, field, needle):
    with pytest.raises(OptionError) as e:
        parse(raw, n=n)
    assert e.value.field == field and needle in str(e.value)
    # The same option arriving in vllm_xargs: the same message, the field's path says where it came from.
    top = field.split(".")[0] if field != "n" else None
    paths = {name: f"vllm_xargs.{name}" for name in raw}
    with pytest.raises(OptionError) as x:
        parse(raw, n=n, paths=paths)
    assert str(x.value) == str(e.value)
    assert x.value.field == (f"vllm_xargs.{field}" if top in raw else field)


def test_engine_side_parse_skips_the_n_check_and_reads_canonical_extra():
    opts = parse({"early_rejection": {"every_tokens": 8}, "flop_budget": 1e12, "kv_keep": 0.25}, n=4)
    again = parse(opts.as_extra())  # what the engine sees: no n, the rejection config as JSON text
    assert again == opts and again.as_extra() == opts.as_extra()


def test_defaults_fill_what_a_request_leaves_unset():
    d = Defaults(
        flop_budget=5e11,
        max_flop_budget=1e12,
        early_rejection={"every_tokens": 16},
        prm="verifier:arithmetic",
        kv_policy="tova",
        kv_keep=0.5,
    )
    opts = parse({}, d, n=4)
    assert opts.flop_budget == 5e11 and opts.early_rejection.every_tokens == 16 and opts.kv.policy == "tova"
    assert parse({}, d, n=1).early_rejection is None  # the rejection default is for n>1 requests only
    assert parse({"flop_budget": 1e9, "kv_keep": 1.0}, d, n=1).flop_budget == 1e9
    assert parse({"kv_keep": 1.0}, d).kv is None
    with pytest.raises(OptionError, match="maximum"):
        parse({"flop_budget": 2e12}, d)


@pytest.mark.parametrize(
    "text,field",
    [
        ('{"kv_keep": "x"}', "kv_keep"),
        ('{"kv_keep": 2}', "kv_keep"),
        ('{"flop_budget": -1}', "flop_budget"),
        ('{"budget_policy": "lifo"}', "budget_policy"),
        ('{"unknown": 1}', "unknown"),
        ("not json", "defaults"),
        ('{"flop_budget": 2e12, "max_flop_budget": 1e12}', "flop_budget"),
    ],
)
def test_malformed_server_defaults_fail_loudly_naming_the_field(text, field):
    with pytest.raises(OptionError) as e:
        defaults_from_json(text)
    assert e.value.field == field, str(e.value)


def test_defaults_round_trip_through_json():
    d = Defaults(flop_budget=1e9, kv_keep_tokens=256, visual_keep=0.25, early_rejection={"keep": 0.25})
    assert defaults_from_json(d.model_dump_json(exclude_defaults=True)) == d
    assert defaults_from_json(None) == NO_DEFAULTS == defaults_from_json(json.dumps({}))


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"kv_keep": 1.0},
        {"kv_keep": 0.5},
        {"kv_keep_tokens": 300},
        {"flop_budget": 1e12, "early_rejection": {"keep": 0.5}},
    ],
)
def test_prepare_is_idempotent_under_server_defaults(monkeypatch, raw):
    """The chat path checks a request twice (front end, then the platform's validator): the second pass must
    not change it, e.g. re-apply a KV default the request turned off."""
    from flopwise_vllm import options

    monkeypatch.setenv("FLOPWISE_DEFAULTS", '{"kv_keep": 0.25, "early_rejection": {"every_tokens": 8}}')
    first, extra = options.prepare(raw, 4)
    again, extra2 = options.prepare(extra, 4)
    assert again == first and extra2 == extra
    assert options.engine_options(extra) == first.model_copy(update={})
    if raw.get("kv_keep") == 1.0:
        assert first.kv is None
