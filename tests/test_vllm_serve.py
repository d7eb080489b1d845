"""Plain `vllm serve` with flopwise installed and no other step: the scheduler is in place, budgets hold."""

import os
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow


# `vllm_server` (conftest.py): plain `vllm serve`, nothing allow-listed or named, the user did no extra step


def test_flopwise_scheduler_is_in_place(vllm_server):
    s, _, _ = vllm_server
    assert "flopwise_vllm.scheduler.FlopwiseScheduler" in s.log_tail(10**6)


def test_budget_in_vllm_xargs_stops_generation(vllm_server):
    s, ledger, path = vllm_server
    first = httpx.post(
        f"{s.url}/v1/completions", timeout=60, json={"model": path, "prompt": "def f(x):", "max_tokens": 1}
    ).json()
    P = first["usage"]["prompt_tokens"]
    budget = ledger.request(P, 11).total
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=60,
        json={
            "model": path,
            "prompt": "def f(x):",
            "max_tokens": 50,
            "temperature": 0,
            "ignore_eos": True,
            "vllm_xargs": {"flop_budget": budget},
        },
    ).json()
    choice = r["choices"][0]
    assert r["usage"]["completion_tokens"] == 11
    assert choice["finish_reason"] == "length" and choice["stop_reason"] == "flop_budget"
    # Without the endpoint plugin the engine's charge is still returned, in vLLM's own ec_transfer_params.
    assert r["ec_transfer_params"]["flopwise"]["total"] == budget


@pytest.mark.parametrize("bad", ["many", -5, 0])
def test_bad_budget_in_vllm_xargs_is_400(vllm_server, bad):
    s, _, path = vllm_server
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=60,
        json={"model": path, "prompt": "x", "max_tokens": 3, "vllm_xargs": {"flop_budget": bad}},
    )
    assert r.status_code == 400 and "flop_budget" in r.text


@pytest.mark.parametrize(
    "xargs,field", [({"kv_keep": 1.5}, "kv_keep"), ({"kv_policy": "lru", "kv_keep": 0.5}, "kv_policy")]
)
def test_bad_kv_option_in_vllm_xargs_is_400(vllm_server, xargs, field):
    s, _, path = vllm_server
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=60,
        json={"model": path, "prompt": "x", "max_tokens": 3, "vllm_xargs": xargs},
    )
    assert r.status_code == 400 and field in r.text


def test_kv_keep_in_vllm_xargs_drops_in_plain_vllm_serve(vllm_server):
    """Plain `vllm serve` gets the KV-dropping worker and attention backend through the plugin too."""
    s, _, path = vllm_server
    prompt = [(3 * i + 1) % 1900 + 20 for i in range(700)]  # 5 full 128-token blocks + 60
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=60,
        json={
            "model": path,
            "prompt": prompt,
            "max_tokens": 4,
            "vllm_xargs": {"kv_policy": "h2o", "kv_keep": 0.25},
        },
    ).json()
    assert r["ec_transfer_params"]["flopwise"]["kv"]["dropped_blocks"] == 4


def test_opt_out_leaves_stock_vllm(tmp_path):
    """FLOPWISE_SCHEDULER=0: the platform plugin stands aside and vLLM picks its own CPU platform."""
    env = {**os.environ, "FLOPWISE_SCHEDULER": "0"}
    code = "from vllm.platforms import current_platform as p; print(type(p).__module__)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("vllm.platforms.cpu"), out.stderr[-1500:]
    env.pop("FLOPWISE_SCHEDULER")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "flopwise_vllm.platform", out.stderr[-1500:]


def test_early_rejection_in_vllm_xargs_rejects_in_plain_vllm_serve(vllm_server):
    s, _, path = vllm_server
    config = '{"prm": "verifier:arithmetic", "every_tokens": 3, "keep": 0.25}'
    r = httpx.post(
        f"{s.url}/v1/completions",
        timeout=60,
        json={
            "model": path,
            "prompt": "1 + 2 =",
            "max_tokens": 12,
            "n": 4,
            "temperature": 1.0,
            "seed": 3,
            "ignore_eos": True,
            "vllm_xargs": {"early_rejection": config},
        },
    ).json()
    stats = r["ec_transfer_params"]["flopwise"]["early_rejection"]
    assert stats["started"] == 4 and stats["rejected"] == 3 and stats["checkpoints"] == 1
    stopped = [c for c in r["choices"] if c["stop_reason"] == "early_rejection"]
    assert len(stopped) == 3 and all(c["finish_reason"] == "abort" for c in stopped)
