"""--budget-policy smallest-budget: with one slot free, the smaller budget is admitted first."""

import pytest

from flopwise.ledger import FlopModel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy,first_done", [("smallest-budget", "small"), ("fifo", "big")])
def test_admission_order_follows_the_policy(tiny_model, monkeypatch, policy, first_done):
    from vllm import SamplingParams

    from flopwise_serve.offline import LLM

    monkeypatch.setenv("FLOPWISE_DEFAULTS", f'{{"budget_policy": "{policy}"}}')  # the server defaults
    # In-process engine: both requests are queued before the first step, so only the policy decides.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = tiny_model("llama-gqa")
    ledger = FlopModel.from_pretrained(path)
    llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=1, seed=0,
              scheduling_policy="priority" if policy == "smallest-budget" else "fcfs")
    try:
        engine = llm.llm_engine
        prompt = {"prompt_token_ids": list(range(30, 60))}
        for rid, budget in (("big", 1e15), ("small", ledger.request(30, 40).total)):
            engine.add_request(rid, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                           extra_args={"flop_budget": budget}))
        finished = []
        for _ in range(200):
            finished += [o.request_id for o in engine.step() if o.finished]
            if len(finished) == 2:
                break
        assert finished[0] == first_done, finished
    finally:
        llm.shutdown()


def test_smallest_budget_through_flopwise_serve(tiny_model, tmp_path):
    """Over HTTP: with the one slot taken, a big-budget request and then a small-budget one queue; the server's
    --budget-policy smallest-budget admits the small one first."""
    import asyncio
    import json

    import httpx

    from flopwise_serve.launch import flopwise_server, free_port

    path = tiny_model("llama-gqa")
    small = FlopModel.from_pretrained(path).request(40, 8).total * 2

    async def run(url):
        done = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one(name, budget, tokens, stream=False):
                body = {"model": path, "prompt": "def f(x):", "max_tokens": tokens, "temperature": 0,
                        "ignore_eos": True, "flop_budget": budget}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                done.append(name)

            async def blocker(started):
                body = {"model": path, "prompt": "x", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                            started.set()
                done.append("blocker")

            started = asyncio.Event()
            task = asyncio.create_task(blocker(started))
            await started.wait()  # the one slot is taken: the next two wait in the queue
            big = asyncio.create_task(one("big", 1e15, 8))
            await asyncio.sleep(0.2)
            await asyncio.gather(task, big, one("small", small, 8))
        return done

    args = ["--max-model-len", "512", "--max-num-seqs", "1", "--budget-policy", "smallest-budget"]
    with flopwise_server(path, free_port(), tmp_path / "server.log", args) as s:
        done = asyncio.run(run(s.url))
    assert done == ["blocker", "small", "big"], done
