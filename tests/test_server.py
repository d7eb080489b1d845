"""`flopwise serve` over real HTTP with the official openai client: usage.flops, streaming, metrics,
errors."""

import re
import urllib.request

import httpx
import pytest
from conftest import MAX_BUDGET, gauge  # conftest.py: the shared server's --max-flop-budget; a /metrics gauge

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    s, _ = server
    c = OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=60, max_retries=0)
    c.model_id = c.models.list().data[0].id
    return c


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(flopwise_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def test_chat_usage_carries_ledger_flops(server, client):
    _, ledger = server
    r = client.chat.completions.create(
        model=client.model_id,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    u = r.usage
    expected = ledger.request(u.prompt_tokens, u.completion_tokens)
    assert u.completion_tokens == 12
    assert u.flops == {
        "prompt": expected.prefill.total,
        "completion": expected.decode.total,
        "total": expected.total,
        "dense_baseline": expected.total,
    }
    # The engine-to-server carrier is an internal detail and never reaches the client.
    assert "ec_transfer_params" not in (r.model_extra or {}) or r.model_extra["ec_transfer_params"] is None


def test_streaming_final_usage_chunk_has_flops(server, client):
    _, ledger = server
    stream = client.chat.completions.create(
        model=client.model_id,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=7,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    assert final.choices == [] and text
    u = final.usage
    assert u.flops["total"] == ledger.request(u.prompt_tokens, u.completion_tokens).total


def test_completions_n2_charge_both_candidates(server, client):
    _, ledger = server
    r = client.completions.create(
        model=client.model_id,
        prompt="def f(x):",
        max_tokens=6,
        n=2,
        temperature=0.9,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    P = r.usage.prompt_tokens
    assert len(r.choices) == 2
    assert r.usage.flops["total"] == 2 * ledger.request(P, 6).total


def test_metrics_count_what_usage_reports(server, client):
    s, _ = server
    before = _metrics(s.url)
    r = client.completions.create(model=client.model_id, prompt="import os", max_tokens=4, temperature=0)
    after = _metrics(s.url)
    f = r.usage.flops
    key = 'flopwise_flops_total{part="%s"}'
    assert after[key % "prompt"] - before.get(key % "prompt", 0) == f["prompt"]
    assert after[key % "completion"] - before.get(key % "completion", 0) == f["completion"]
    assert after["flopwise_requests_total"] - before.get("flopwise_requests_total", 0) == 1
    assert after["flopwise_engine_flops_total"] >= sum(after[key % p] for p in ("prompt", "completion"))


def test_bad_request_is_400_and_server_keeps_serving(server, client):
    s, _ = server
    r = httpx.post(
        f"{s.url}/v1/chat/completions",
        timeout=30,
        json={"model": client.model_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
    )
    assert r.status_code == 400
    assert "max_tokens" in r.text
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200


# -- FLOP budgets ------------------------------------------------------------------------------------
BAD_BUDGETS = [
    "-1",
    "0",
    "-0.0",
    "NaN",
    "Infinity",
    "-Infinity",
    '"1e9"',
    "true",
    "false",
    '{"a": 1}',
    "[1]",
    str(MAX_BUDGET * 10),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", BAD_BUDGETS)
def test_bad_flop_budget_is_400_naming_the_field(server, client, bad, stream):
    s, _ = server
    # Raw JSON text: the bad budgets include literals (NaN, 1e999) that a JSON encoder would not write.
    messages = '[{"role": "user", "content": "x"}]'
    body = (
        f'{{"model": "{client.model_id}", "messages": {messages}, "max_tokens": 4, '
        f'"stream": {"true" if stream else "false"}, "flop_budget": {bad}}}'
    )
    r = httpx.post(
        f"{s.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "flop_budget" and "flop_budget" in err["message"]


def test_budget_in_vllm_xargs_is_validated_too(server, client):
    s, _ = server
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=30,
        json={
            "model": client.model_id,
            "prompt": "x",
            "max_tokens": 3,
            "vllm_xargs": {"flop_budget": "lots"},
        },
    )
    assert r.status_code == 400 and "flop_budget" in r.text


def test_unaffordable_prefill_is_refused_with_both_numbers(server, client):
    s, ledger = server
    prompt = "def f(x):"
    P = client.completions.create(model=client.model_id, prompt=prompt, max_tokens=1).usage.prompt_tokens
    need = ledger.request(P, 1).total
    before = _metrics(s.url).get("flopwise_requests_refused_total", 0)
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=30,
        json={"model": client.model_id, "prompt": prompt, "max_tokens": 3, "flop_budget": need - 1},
    )
    assert r.status_code == 400
    assert f"{need - 1:,}" in r.json()["error"]["message"] and f"{need:,}" in r.json()["error"]["message"]
    assert _metrics(s.url)["flopwise_requests_refused_total"] == before + 1


@pytest.mark.parametrize("stream", [False, True])
def test_budget_stops_generation_through_flopwise_serve(server, client, stream):
    s, ledger = server
    messages = [{"role": "user", "content": "tell me a story"}]
    P = client.chat.completions.create(
        model=client.model_id, messages=messages, max_tokens=1
    ).usage.prompt_tokens
    budget = ledger.request(P, 11).total
    kwargs = dict(
        model=client.model_id,
        messages=messages,
        max_tokens=60,
        temperature=0,
        extra_body={"ignore_eos": True, "flop_budget": budget},
    )
    capped_before = _metrics(s.url).get("flopwise_requests_capped_total", 0)
    if stream:
        chunks = list(
            client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
        )
        finish = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        choice = finish[-1]
    else:
        r = client.chat.completions.create(**kwargs)
        usage, choice = r.usage, r.choices[0]
    assert usage.completion_tokens == 11
    assert choice.finish_reason == "length" and choice.model_extra["stop_reason"] == "flop_budget"
    assert usage.flops["total"] == budget and usage.flops["budget"] == budget
    assert _metrics(s.url)["flopwise_requests_capped_total"] == capped_before + 1


def test_server_default_and_request_budget(server, client):
    """A top-level flop_budget wins over vllm_xargs; either way the charge stays within it."""
    _, ledger = server
    r = client.completions.create(
        model=client.model_id,
        prompt="def g(y):",
        max_tokens=50,
        temperature=0,
        extra_body={"ignore_eos": True, "flop_budget": 2e7, "vllm_xargs": {"flop_budget": 1e12}},
    )
    assert r.usage.flops["budget"] == 2e7 and r.usage.flops["total"] <= 2e7
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens < 50


# -- load ------------------------------------------------------------------------------------------
def test_load_200_mixed_requests(server, client):
    """200 concurrent requests: random budgets (tiny ones too), streaming or not, n up to 4, some clients
    hanging up mid-stream. Bounded to about a minute; afterwards the engine is idle with no KV blocks held."""
    import asyncio
    import json as _json
    import random
    import time

    s, ledger = server
    rng = random.Random(7)
    prefill = ledger.request(12, 1).total
    results = {"ok": 0, "refused": 0, "disconnected": 0, "over_budget": [], "5xx": []}

    async def one(http, i):
        n = rng.choice([1, 1, 2, 4])
        budget = rng.choice([None, prefill // 2, prefill * 1.2, prefill * n * 3, 1e11])
        stream = rng.random() < 0.5
        hang_up = stream and rng.random() < 0.3
        body = {
            "model": client.model_id,
            "prompt": f"item {i}: def f(x):",
            "max_tokens": rng.randint(4, 96),
            "n": n,
            "temperature": 0.8 if n > 1 else 0,
            "stream": stream,
            "ignore_eos": True,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if budget is not None:
            body["flop_budget"] = budget
        if not stream:
            r = await http.post("/v1/completions", json=body)
            if r.status_code >= 500:
                results["5xx"].append(r.text)
            elif r.status_code == 400:
                results["refused"] += 1
            else:
                results["ok"] += 1
                total = r.json()["usage"]["flops"]["total"]
                if budget is not None and total > budget:
                    results["over_budget"].append((budget, total))
            return
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code >= 500:
                results["5xx"].append(r.status_code)
                return
            if r.status_code == 400:
                await r.aread()
                results["refused"] += 1
                return
            seen = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                seen += 1
                if hang_up and seen == 2:
                    results["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
                chunk = _json.loads(line[6:])
                if not chunk["choices"] and chunk.get("usage"):
                    total = chunk["usage"]["flops"]["total"]
                    if budget is not None and total > budget:
                        results["over_budget"].append((budget, total))
            results["ok"] += 1

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=s.url, timeout=90, limits=limits) as http:
            await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(200))), timeout=120)

    t0 = time.monotonic()
    asyncio.run(main())
    print(
        f"load: {results['ok']} ok, {results['refused']} refused, {results['disconnected']} hung up, "
        f"{time.monotonic() - t0:.1f}s"
    )
    assert results["5xx"] == [] and results["over_budget"] == []
    assert results["ok"] + results["refused"] + results["disconnected"] == 200
    assert results["refused"] > 0 and results["ok"] > 100
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    # Every request finished or was aborted: nothing running, waiting, or holding KV blocks.
    deadline, idle = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        text = httpx.get(f"{s.url}/metrics", timeout=10).text
        gauges = {
            m.group(1): float(m.group(2))
            for m in re.finditer(
                r"^(vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc))\{[^}]*\} (\S+)$",
                text,
                re.M,
            )
        }
        idle = gauges
        if gauges and all(v == 0 for v in gauges.values()):
            break
        time.sleep(1)
    assert idle and all(v == 0 for v in idle.values()), idle


# -- early rejection -------------------------------------------------------------------------------
def _er_request(client, **extra):
    return dict(
        model=client.model_id,
        messages=[{"role": "user", "content": "count to ten"}],
        n=8,
        max_tokens=32,
        temperature=1.0,
        extra_body={"ignore_eos": True, **extra},
    )


def test_early_rejection_n8_costs_less_and_reports_stats(server, client):
    """The issue's acceptance: n=8 with early rejection through the openai client costs fewer FLOPs."""
    _, ledger = server
    full = client.chat.completions.create(**_er_request(client))
    r = client.chat.completions.create(
        **_er_request(client, early_rejection={"every_tokens": 4, "keep": 0.5})
    )
    assert len(full.choices) == 8 and full.usage.completion_tokens == 8 * 32
    stats = r.model_extra["early_rejection"]
    # 8 -> 4 at 4 tokens, 4 -> 2 at 8, 2 -> 1 at 12 (the tiny model writes no arithmetic: all tie at 0.5)
    assert (stats["started"], stats["rejected"], stats["checkpoints"]) == (8, 7, 3)
    assert stats["rejected_at"] == {"1": 3, "2": 2, "3": 2, "4": 1, "5": 1, "6": 1, "7": 1}
    assert stats["tokens_saved"] == 4 * 28 + 2 * 24 + 20
    assert [c.index for c in r.choices] == [0] and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].message.content) > 0
    lengths = [32, 12, 8, 8, 4, 4, 4, 4]
    assert r.usage.completion_tokens == sum(lengths)  # rejected tokens were generated: they count
    P = r.usage.prompt_tokens
    # each candidate prefills (prompt < one KV block)
    expected = sum(ledger.request(P, n).total for n in lengths)
    assert r.usage.flops["total"] == expected and r.usage.flops["prm"] == 0  # the verifier costs no FLOPs
    assert (
        r.usage.flops["total"]
        < full.usage.flops["total"]
        == sum(ledger.request(P, 32).total for _ in range(8))
    )


def test_early_rejection_streams_rejections_as_abort(server, client):
    chunks = list(
        client.chat.completions.create(
            stream=True,
            stream_options={"include_usage": True},
            **_er_request(client, early_rejection={"every_tokens": 4, "keep": 0.5}),
        )
    )
    finish = {c.choices[0].index: c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason}
    assert len(finish) == 8
    rejected = [
        i
        for i, c in finish.items()
        if c.finish_reason == "abort" and c.model_extra["stop_reason"] == "early_rejection"
    ]
    assert len(rejected) == 7
    assert chunks[-1].model_extra["early_rejection"]["rejected"] == 7 and chunks[-1].usage.flops["total"] > 0


def test_width_and_accept_run_two_candidates_and_stop_at_the_first_answer(server, client):
    """``width: 2`` + ``accept``: the tiny model writes no arithmetic, so every answer gets the verifier's
    neutral 0.5; ``accept: 0.5`` takes the first of the two running candidates to finish, and the six waiting
    never start, nor cost anything."""
    _, ledger = server
    r = client.chat.completions.create(**_er_request(client, early_rejection={"width": 2, "accept": 0.5}))
    stats = r.model_extra["early_rejection"]
    assert stats["accepted"] in (0, 1) and stats["never_started"] == stats["rejected"] == 6
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 2 * 32
    assert r.usage.flops["total"] == 2 * ledger.request(r.usage.prompt_tokens, 32).total


@pytest.mark.parametrize(
    "body,param",
    [
        ({"early_rejection": {"prm": "no-such-prm"}}, "early_rejection.prm"),
        ({"early_rejection": {"prm": "verifier:nope"}}, "early_rejection.prm"),
        ({"early_rejection": {"keep": 0}}, "early_rejection.keep"),
        ({"early_rejection": {"keep": 1.5}}, "early_rejection.keep"),
        ({"early_rejection": {"every_tokens": 0}}, "early_rejection.every_tokens"),
        ({"early_rejection": {"mode": "beam"}}, "early_rejection.mode"),
        ({"early_rejection": "yes"}, "early_rejection"),
        ({"early_rejection": {}, "n": 1}, "n"),
        ({"early_rejection": {"prm": "confidence:mean"}}, "early_rejection.prm"),
        ({"early_rejection": {"prm": "self:nope"}}, "early_rejection.prm"),
        ({"early_rejection": {"prm": "self:chain-sum"}}, "early_rejection.prm"),  # fitted on another model
        ({"early_rejection": {"threshold": 1.5}}, "early_rejection.threshold"),
        ({"early_rejection": {"margin": -1}}, "early_rejection.margin"),
        ({"early_rejection": {"percentile": 100}}, "early_rejection.percentile"),
        ({"early_rejection": {"width": 2, "margin": 0.1}}, "early_rejection.width"),
    ],
)
def test_bad_early_rejection_is_400_naming_the_field(server, client, body, param):
    s, _ = server
    payload = {
        "model": client.model_id,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "n": 4,
        "temperature": 1.0,
        **body,
    }
    r = httpx.post(f"{s.url}/v1/chat/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200


def test_confidence_scorer_over_http(server, client):
    """The generator's own confidence prunes with no PRM: each generated token's log-softmax is charged as
    ``prm``, the warm-up cut is reported, and the client gets only the logprobs it asked for."""
    from flopwise.prm import confidence

    _, ledger = server
    er = {"prm": "confidence", "every_tokens": 8, "percentile": 50, "confidence_window": 4}
    for asked in (None, 2):
        extra = {"logprobs": True, "top_logprobs": asked} if asked else {}
        r = client.chat.completions.create(**_er_request(client, early_rejection=er), **extra)
        stats = r.model_extra["early_rejection"]
        assert stats["prm"] == "confidence" and 0 < stats["rejected"] < 8 and "cut" in stats
        assert r.usage.flops["prm"] == r.usage.completion_tokens * confidence.flops_per_token(
            ledger.spec.vocab, 20
        )
        for choice in r.choices:
            if asked is None:
                assert choice.logprobs is None
            else:
                assert all(len(t.top_logprobs) == asked for t in choice.logprobs.content)


def test_early_rejection_on_completions_endpoint(server, client):
    r = client.completions.create(
        model=client.model_id,
        prompt="1, 2, 3,",
        n=4,
        max_tokens=12,
        temperature=1.0,
        extra_body={"ignore_eos": True, "early_rejection": {"every_tokens": 3, "keep": 0.5}},
    )
    assert r.model_extra["early_rejection"]["rejected"] == 3
    assert [c.index for c in r.choices] == [0] and r.usage.completion_tokens == 12 + 6 + 3 + 3


# -- KV dropping -------------------------------------------------------------------------------------
def _long_prompt(seed: int, n: int = 700) -> list[int]:
    return [(seed * i + 5) % 1900 + 20 for i in range(n)]


def _reads_cached_kv(ledger) -> bool:
    """Whether the shared server's dropping requests read prefix-cache hits: flopwise reads the CPU cache
    layout back except AMX's (bf16 on an AMX CPU, packed for its tiles: those requests recompute)."""
    import torch

    from flopwise.hw import default_dtype
    from flopwise_vllm.kv_cache_io import READABLE_ISAS, attn_isa

    return attn_isa(getattr(torch, default_dtype()), 128, ledger.spec.layers[0].head_dim) in READABLE_ISAS


@pytest.mark.parametrize("where", ["top", "vllm_xargs"])
def test_kv_keep_cuts_attention_and_blocks(server, client, where):
    """700 prompt tokens in 128-token blocks: 5 full blocks + 60 in the tail. kv_keep 0.25 keeps one
    block of the region (with the tail, 188 tokens >= 175) and frees the other four."""
    s, ledger = server
    hit = 512 if _reads_cached_kv(ledger) else 0  # the full request cached 5 blocks; the window's is redone
    prompt = _long_prompt(3 if where == "top" else 31)
    kv = {"kv_policy": "snapkv", "kv_keep": 0.25}
    before = _metrics(s.url)
    extra = kv if where == "top" else {"vllm_xargs": kv}
    # The prompt in full first: it leaves the prompt in the prefix cache, and the drop after it still drops
    # (it reads the cached blocks, recomputing only the 64-query window, in whole 128-token blocks; on AMX it
    # recomputes the prompt).
    full = client.completions.create(model=client.model_id, prompt=prompt, max_tokens=8, temperature=0)
    cut = client.completions.create(
        model=client.model_id, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra
    )
    after = _metrics(s.url)
    f, g = cut.usage.flops, full.usage.flops
    assert f["kv"] == {"prompt_tokens": 700, "kept_tokens": 188, "dropped_tokens": 512, "dropped_blocks": 4}
    assert g["total"] == ledger.request(700, 8).total
    assert f["dense_baseline"] == ledger.request(700, 8, cached_tokens=hit).total
    assert f["total"] == ledger.request(700, 8, cached_tokens=hit, kv_dropped=512).total + f["kv_scoring"]
    full_attention = ledger.request(700, 8).decode.flops["attention"]
    assert (
        full_attention - ledger.request(700, 8, kv_dropped=512).decode.flops["attention"]
        == 4 * sum(x.q_heads * x.head_dim for x in ledger.spec.layers) * 7 * 512
    )
    assert (
        after["flopwise_kv_dropped_tokens_total"] - before.get("flopwise_kv_dropped_tokens_total", 0) == 512
    )


def test_kv_keep_holds_fewer_blocks_while_generating(server, client):
    """vLLM's own KV-cache usage gauge, read mid-generation: 2 blocks held (kept + tail) instead of 6."""
    s, _ = server
    usage = {}
    for keep in (1.0, 0.25):
        stream = client.completions.create(
            model=client.model_id,
            prompt=_long_prompt(41 if keep < 1 else 43),
            max_tokens=60,
            temperature=0,
            stream=True,
            extra_body={"kv_policy": "knorm", "kv_keep": keep, "ignore_eos": True},
        )
        # Read right after the first tokens, while the engine is still generating the other ~57 (it runs ahead
        # of the client, so a late reading can come after the request finished).
        readings = [gauge(s.url, "vllm:kv_cache_usage_perc") for i, _ in enumerate(stream) if i < 3]
        usage[keep] = max(readings)
    assert usage[1.0] > 0 and usage[1.0] / usage[0.25] == pytest.approx(3, rel=0.01), usage


def test_kv_usage_says_why_nothing_was_dropped_and_no_block_leaks(server, client):
    """A prompt whose kept share covers all its whole blocks drops nothing, and ``usage.flops.kv`` says so;
    once the KV tests' requests are done the engine holds no block (vLLM's own usage gauge reads 0)."""
    s, _ = server
    r = client.completions.create(
        model=client.model_id,
        prompt=_long_prompt(47, n=150),
        max_tokens=4,
        temperature=0,
        extra_body={"kv_policy": "snapkv", "kv_keep": 0.9},
    )
    kv = r.usage.flops["kv"]
    assert (
        kv["dropped_tokens"] == 0 and kv["kept_tokens"] == 150 and "covers every whole block" in kv["reason"]
    )
    assert gauge(s.url, "vllm:kv_cache_usage_perc") == 0


@pytest.mark.parametrize(
    "body,param",
    [
        ({"kv_policy": "lru", "kv_keep": 0.5}, "kv_policy"),
        ({"kv_keep": 0}, "kv_keep"),
        ({"kv_keep": 1.5}, "kv_keep"),
        ({"kv_keep": "0.5"}, "kv_keep"),
        ({"kv_policy": "snapkv", "kv_keep_tokens": 10}, "kv_keep_tokens"),
        ({"kv_keep": 0.5, "kv_keep_tokens": 200}, "kv_keep_tokens"),
        ({"vllm_xargs": {"kv_keep": 2}}, "vllm_xargs.kv_keep"),
        ({"vllm_xargs": {"kv_policy": "x", "kv_keep": 0.5}}, "vllm_xargs.kv_policy"),
    ],
)
def test_bad_kv_option_is_400_naming_the_field(server, client, body, param):
    s, _ = server
    r = httpx.post(
        f"{s.url}/v1/chat/completions",
        timeout=30,
        json={
            "model": client.model_id,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            **body,
        },
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"]
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
