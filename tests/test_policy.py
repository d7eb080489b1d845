"""--budget-policy smallest-budget: with one slot free, the smaller budget is admitted first."""

import asyncio
import json

import httpx
import pytest
from conftest import gauge

from flopwise.ledger import FlopModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy_server(tiny_model, tmp_path_factory):
    """``flopwise serve --budget-policy smallest-budget --default-flop-budget D`` with one slot."""
    from flopwise_serve.launch import flopwise_server, free_port

    path = tiny_model("llama-gqa")
    ledger = FlopModel.from_pretrained(path)
    default = ledger.request(200, 20).total  # covers a short request, not a long prompt
    args = [
        "--max-model-len",
        "4096",  # room for a blocker that outlasts the queueing on a slow CI machine
        "--max-num-seqs",
        "1",
        "--budget-policy",
        "smallest-budget",
        "--default-flop-budget",
        str(default),
    ]
    log = tmp_path_factory.mktemp("policy") / "server.log"
    with flopwise_server(path, free_port(), log, args) as s:
        yield s, path, ledger, default


@pytest.mark.parametrize("policy,first_done", [("smallest-budget", "small"), ("fifo", "big")])
def test_admission_order_follows_the_policy(tiny_model, monkeypatch, policy, first_done):
    from vllm import SamplingParams

    from flopwise_serve.offline import LLM

    monkeypatch.setenv("FLOPWISE_DEFAULTS", f'{{"budget_policy": "{policy}"}}')  # the server defaults
    # In-process engine: both requests are queued before the first step, so only the policy decides.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = tiny_model("llama-gqa")
    ledger = FlopModel.from_pretrained(path)
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=1,
        seed=0,
        scheduling_policy="priority" if policy == "smallest-budget" else "fcfs",
    )
    try:
        engine = llm.llm_engine
        prompt = {"prompt_token_ids": list(range(30, 60))}
        for rid, budget in (("big", 1e15), ("small", ledger.request(30, 40).total)):
            engine.add_request(
                rid,
                prompt,
                SamplingParams(
                    max_tokens=8, temperature=0, ignore_eos=True, extra_args={"flop_budget": budget}
                ),
            )
        finished = []
        for _ in range(200):
            finished += [o.request_id for o in engine.step() if o.finished]
            if len(finished) == 2:
                break
        assert finished[0] == first_done, finished
    finally:
        llm.shutdown()


def test_smallest_budget_through_flopwise_serve(policy_server):
    """Over HTTP: with the one slot taken, a big-budget request and then a small-budget one queue; the
    server's --budget-policy smallest-budget admits the small one first. The blocker holds the slot until the
    server reports both waiting, then hangs up (the server aborts it), so no timing decides the order."""
    s, path, ledger, _ = policy_server
    small = ledger.request(40, 8).total * 2

    def body(budget, tokens, **extra):
        return {
            "model": path,
            "prompt": "def f(x):",
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "flop_budget": budget,
            **extra,
        }

    async def until_waiting(n, blocker):
        for _ in range(400):  # 20 s
            if gauge(s.url, "vllm:num_requests_waiting") >= n:  # one engine
                return
            assert not blocker.done(), "the blocker finished before both requests queued"
            await asyncio.sleep(0.05)
        raise AssertionError(f"the server never reported {n} waiting")

    async def run():
        done = []
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as client:

            async def one(name, budget):
                r = await client.post("/v1/completions", json=body(budget, 8))
                assert r.status_code == 200, r.text
                done.append(name)

            async def blocker(started, release):
                long = body(1e15, 4000, prompt="x", stream=True)  # max-model-len 4096
                async with client.stream("POST", "/v1/completions", json=long) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                            started.set()
                        if release.is_set():
                            return  # leaving the stream hangs up: the server aborts the blocker

            started, release = asyncio.Event(), asyncio.Event()
            held = asyncio.create_task(blocker(started, release))
            await started.wait()  # the one slot is taken: the next two wait in the queue
            big = asyncio.create_task(one("big", 1e15))
            await until_waiting(1, held)
            small_task = asyncio.create_task(one("small", small))
            await until_waiting(2, held)
            release.set()
            await asyncio.gather(held, big, small_task)
        return done

    assert asyncio.run(run()) == ["small", "big"]


def test_default_budget_holds_on_responses_and_messages(policy_server):
    """/v1/responses and /v1/messages bypass the chat/completion handlers; the platform's request validator
    does not: the default budget refuses what cannot fit and caps what runs."""
    from openai import BadRequestError, OpenAI

    s, path, ledger, default = policy_server
    client = OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=120, max_retries=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    long_text = "tell me about this:"
    while len(tok(long_text)["input_ids"]) < 400:  # twice the prefill the default budget covers
        long_text += " the quick brown fox jumps over the lazy dog"
    with pytest.raises(BadRequestError, match="cannot cover this request's prefill"):
        client.responses.create(model=path, input=long_text, max_output_tokens=8)
    r = client.responses.create(model=path, input="hi", max_output_tokens=400, temperature=0)
    # The default budget (a 200-token prefill + 20 decode steps' worth) stops a short prompt's generation
    # early.
    assert (
        r.usage.output_tokens < 400
        and ledger.request(r.usage.input_tokens, r.usage.output_tokens).total <= default
    )
    m = httpx.post(
        f"{s.url}/v1/messages",
        timeout=120,
        json={"model": path, "max_tokens": 8, "messages": [{"role": "user", "content": long_text}]},
    )
    assert m.status_code == 400 and "cannot cover this request's prefill" in m.text
    m = httpx.post(
        f"{s.url}/v1/messages",
        timeout=120,
        json={"model": path, "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert m.status_code == 200 and m.json()["usage"]["output_tokens"] < 400
