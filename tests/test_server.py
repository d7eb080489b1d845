"""`flopwise serve` over real HTTP with the official openai client: usage.flops, streaming, metrics, errors."""

import re
import urllib.request

import httpx
import pytest

from flopwise.ledger import FlopModel
from flopwise_serve.launch import flopwise_server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    path = tiny_model("llama-gqa")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with flopwise_server(path, free_port(), log, ["--max-model-len", "1024"]) as s:
        yield s, FlopModel.from_pretrained(path)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    s, _ = server
    c = OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=60, max_retries=0)
    c.model_id = c.models.list().data[0].id
    return c


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(flopwise_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def test_chat_usage_carries_ledger_flops(server, client):
    _, ledger = server
    r = client.chat.completions.create(model=client.model_id, messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    u = r.usage
    expected = ledger.request(u.prompt_tokens, u.completion_tokens)
    assert u.completion_tokens == 12
    assert u.flops == {"prompt": expected.prefill.total, "completion": expected.decode.total,
                       "total": expected.total, "dense_baseline": expected.total}
    # The engine-to-server carrier is an internal detail and never reaches the client.
    assert "ec_transfer_params" not in (r.model_extra or {}) or r.model_extra["ec_transfer_params"] is None


def test_streaming_final_usage_chunk_has_flops(server, client):
    _, ledger = server
    stream = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "count"}], max_tokens=7, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    assert final.choices == [] and text
    u = final.usage
    assert u.flops["total"] == ledger.request(u.prompt_tokens, u.completion_tokens).total


def test_completions_n2_charge_both_candidates(server, client):
    _, ledger = server
    r = client.completions.create(model=client.model_id, prompt="def f(x):", max_tokens=6, n=2, temperature=0.9,
                                  seed=5, extra_body={"ignore_eos": True})
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
    r = httpx.post(f"{s.url}/v1/chat/completions", timeout=30,
                   json={"model": client.model_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
    assert r.status_code == 400
    assert "max_tokens" in r.text
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
