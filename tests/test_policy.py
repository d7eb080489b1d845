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
