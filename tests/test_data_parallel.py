"""Several engines behind one endpoint: ``flopwise serve … --data-parallel-size 2`` (vLLM's data parallelism,
which the CPU build supports). Budgets hold per request, a request's n candidates share one engine (one
budget, one ledger group), and the flopwise counters on /metrics add up over both engines."""

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flopwise.ledger import FlopModel
from flopwise_serve.launch import flopwise_server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    path = tiny_model("llama-gqa")
    log = tmp_path_factory.mktemp("dp") / "server.log"
    with flopwise_server(
        path, free_port(), log, ["--max-model-len", "1024", "--data-parallel-size", "2"]
    ) as s:
        yield s, FlopModel.from_pretrained(path)


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^((?:flopwise_|vllm:)\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def test_two_engines_one_endpoint_budgets_and_counters(server):
    s, ledger = server
    plain = [
        {"prompt": f"def f{i}(x):", "max_tokens": 8, "temperature": 0, "ignore_eos": True} for i in range(8)
    ]
    one = ledger.request(6, 16).total
    capped = {"prompt": "def g(x):", "max_tokens": 64, "ignore_eos": True, "flop_budget": one}
    # Four candidates that could spend 4 x 24 tokens, under a budget that fits about two of them.
    group = {
        "prompt": "x =",
        "n": 4,
        "max_tokens": 24,
        "temperature": 1.0,
        "ignore_eos": True,
        "flop_budget": 2 * ledger.request(4, 24).total,
    }
    bodies = plain + [capped, group]
    with httpx.Client(base_url=s.url, timeout=120) as http, ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: http.post("/v1/completions", json=b), bodies))
    assert all(r.status_code == 200 for r in responses), [
        r.text[:300] for r in responses if r.status_code != 200
    ]
    out = [r.json() for r in responses]

    for body in out[: len(plain)]:
        u = body["usage"]
        assert u["completion_tokens"] == 8
        assert u["flops"]["total"] == ledger.request(u["prompt_tokens"], 8).total
    cap = out[len(plain)]
    assert cap["choices"][0]["stop_reason"] == "flop_budget" and cap["usage"]["flops"]["total"] <= one
    grp = out[-1]
    assert len(grp["choices"]) == 4 and grp["usage"]["flops"]["total"] <= group["flop_budget"]
    # The shared budget stopped the group short: all four candidates running to 24 tokens would cost more.
    assert grp["usage"]["completion_tokens"] < 4 * 24
    assert any(c["stop_reason"] == "flop_budget" for c in grp["choices"])

    m = _metrics(s.url)
    per_engine = {
        e: sum(v for k, v in m.items() if k.startswith("vllm:request_success_total") and f'engine="{e}"' in k)
        for e in ("0", "1")
    }
    assert per_engine["0"] > 0 and per_engine["1"] > 0, per_engine  # both engines served requests
    charged = sum(b["usage"]["flops"]["total"] for b in out)
    assert m["flopwise_requests_total"] == len(bodies)
    assert m['flopwise_flops_total{part="prompt"}'] + m['flopwise_flops_total{part="completion"}'] == charged
    # What the engines computed, summed over both (every request finished, none aborted): the charges.
    assert m["flopwise_engine_flops_total"] == charged
    assert m["flopwise_requests_capped_total"] == 2
