"""A real vLLM engine with the flopwise scheduler: what it charges equals the ledger, step for step."""

import gc

import pytest

from flopwise.hw import cpu_flags
from flopwise.ledger import FlopModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["llama-gqa", "mixtral"])
def engine(request, tiny_model):
    from flopwise_serve.offline import LLM

    path = tiny_model(request.param)
    # flopwise's offline API puts the flopwise scheduler in place; 128-token steps make the 300-token
    # prompts below prefill in three chunks.
    llm = LLM(path, dtype="float32", max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=8, seed=0)
    yield llm, FlopModel.from_pretrained(path), path
    llm.shutdown()
    del llm
    gc.collect()


def _charge(output) -> dict:
    return output.ec_transfer_params["flopwise"]


def _greedy(n_tokens):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)


def test_short_prompts_cost_exactly_the_ledger(engine):
    llm, ledger, _ = engine
    outs = llm.generate(["def foo(x):", "import os\nimport sys\n" * 6, "class A:\n    pass\n"], _greedy(13))
    for out in outs:
        P, O = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        assert O == 13
        expected = ledger.request(P, O, cached_tokens=out.num_cached_tokens or 0)
        charge = _charge(out)
        assert charge["prompt"] == expected.prefill.total
        assert charge["completion"] == expected.decode.total
        assert charge["total"] == charge["dense_baseline"] == expected.total
        assert charge["components"] == (expected.prefill + expected.decode).as_dict()


def test_chunked_prefill_and_prefix_cache_are_charged_as_computed(engine):
    llm, ledger, _ = engine
    prompt = {"prompt_token_ids": [(7 * i) % 1900 + 20 for i in range(300)]}
    first, second = (llm.generate([prompt], _greedy(5))[0] for _ in range(2))
    # First run: 300 prompt tokens in chunks of 128, 128, 44; each chunk computes one row of logits.
    one_logit_row = 2 * ledger.spec.hidden * ledger.spec.vocab
    assert (first.num_cached_tokens or 0) == 0
    assert _charge(first)["total"] == ledger.request(300, 5).total + 2 * one_logit_row
    # Second run: the two full 128-token blocks come from the prefix cache and are not recomputed.
    assert second.num_cached_tokens == 256
    assert _charge(second)["total"] == ledger.request(300, 5, cached_tokens=256).total
    assert _charge(second)["total"] < _charge(first)["total"]


def test_n_candidates_sum_into_one_request(engine):
    from vllm import SamplingParams

    llm, ledger, _ = engine
    out = llm.generate(["def bar(y):"], SamplingParams(n=3, max_tokens=9, temperature=1.0, seed=3))[0]
    charge = _charge(out)
    assert charge["requests"] == 3
    P = len(out.prompt_token_ids)  # under one block: children share no cached prompt blocks
    assert charge["total"] == sum(ledger.request(P, len(c.token_ids)).total for c in out.outputs)


def _budgeted(n_tokens, budget, **kw):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=n_tokens,
        temperature=kw.pop("temperature", 0),
        ignore_eos=True,
        extra_args={"flop_budget": budget},
        **kw,
    )


PROMPT = {"prompt_token_ids": list(range(20, 70))}


def test_budget_of_prefill_plus_ten_decode_steps_gives_eleven_tokens(engine):
    llm, ledger, _ = engine
    budget = ledger.request(50, 11).total  # the prefill makes token 1, ten decode steps tokens 2..11
    out = llm.generate([PROMPT], _budgeted(40, budget))[0]
    c = out.outputs[0]
    assert len(c.token_ids) == 11
    assert (c.finish_reason, c.stop_reason) == ("length", "flop_budget")
    assert _charge(out)["total"] == budget and _charge(out)["capped"] is True
    # One FLOP less and the tenth decode step no longer fits.
    out = llm.generate([PROMPT], _budgeted(40, budget - 1))[0]
    assert len(out.outputs[0].token_ids) == 10 and _charge(out)["total"] <= budget - 1


@pytest.mark.parametrize("extra_tokens", [0, 3, 17])
def test_charge_never_exceeds_budget_and_stops_as_late_as_possible(engine, extra_tokens):
    llm, ledger, _ = engine
    budget = (
        ledger.request(50, 1).total
        + ledger.forward(extra_tokens, start=50, logits=extra_tokens).total
        + 12345
    )
    out = llm.generate([PROMPT], _budgeted(40, budget))[0]
    n, total = len(out.outputs[0].token_ids), _charge(out)["total"]
    assert total <= budget
    assert n == 1 + extra_tokens  # every affordable decode step ran
    assert total + ledger.forward(1, start=50 + n - 1, logits=1).total > budget  # the next one would not fit


def test_budget_below_prefill_is_refused_before_anything_runs(engine):
    from vllm.exceptions import VLLMValidationError

    from flopwise.techniques import OptionError

    llm, ledger, _ = engine
    # extra_args straight into vLLM's own LLM: the platform's request validator refuses it, as the servers do.
    with pytest.raises(VLLMValidationError, match="cannot cover this request's prefill of 50 tokens"):
        llm.engine.generate([PROMPT], _budgeted(10, ledger.request(50, 1).total - 1))
    with pytest.raises(OptionError, match="prefill of 50 tokens") as e:
        llm.generate([PROMPT], _budgeted(10, ledger.request(50, 1).total - 1))
    assert e.value.field == "flop_budget"


def test_n_candidates_share_one_budget(engine):
    llm, ledger, _ = engine
    budget = 2 * ledger.request(50, 11).total
    out = llm.generate([PROMPT], _budgeted(30, budget, n=4, temperature=1.0, seed=1))[0]
    charge = _charge(out)
    assert charge["requests"] == 4 and charge["total"] <= budget
    assert (
        sum(ledger.request(50, max(1, len(c.token_ids))).total for c in out.outputs if c.token_ids)
        == charge["total"]
    )
    assert all(c.stop_reason == "flop_budget" for c in out.outputs)


def test_budget_holds_through_chunked_prefill(engine):
    """Chunks pay a logits row each; the gate bounds each chunk by the whole remaining prefill."""
    llm, ledger, _ = engine
    prompt = {"prompt_token_ids": [(11 * i) % 1900 + 20 for i in range(300)]}
    budget = ledger.request(300, 1).total + 1  # covers one unchunked prefill, not three chunks' logits
    out = llm.generate([prompt], _budgeted(5, budget))[0]
    assert _charge(out)["total"] <= budget
    assert out.outputs[0].stop_reason == "flop_budget"


def test_offline_api_budget_keyword_and_admission(engine):
    from flopwise.techniques import OptionError
    from flopwise_serve.offline import flops_of

    llm, ledger, _ = engine
    budget = ledger.request(50, 6).total
    out = llm.generate([PROMPT], max_tokens=30, temperature=0, ignore_eos=True, flop_budget=budget)[0]
    assert len(out.outputs[0].token_ids) == 6
    assert flops_of(out) == {
        "prompt": ledger.request(50, 1).total,
        "completion": ledger.request(50, 6).decode.total,
        "total": budget,
        "dense_baseline": budget,
        "budget": budget,
    }
    with pytest.raises(OptionError, match="prefill of 50 tokens"):
        llm.generate([PROMPT], max_tokens=5, flop_budget=ledger.request(50, 1).total - 1)


@pytest.mark.skipif("amx_tile" not in cpu_flags(), reason="no AMX here")
def test_bf16_one_token_prompt_on_amx(tiny_model, monkeypatch):
    """bf16 on an AMX CPU, a one-token prompt: vLLM's attention is the process's first AMX user, which
    dies of SIGILL unless the plugin has asked Linux for the tile state (flopwise.hw.allow_amx)."""
    from flopwise_serve.offline import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # a fresh engine process: nothing asked yet
    llm = LLM(tiny_model("llama-gqa"), dtype="bfloat16", max_model_len=256)
    try:
        (out,) = llm.generate({"prompt_token_ids": [7]}, _greedy(4))
        assert len(out.outputs[0].token_ids) == 4
    finally:
        llm.shutdown()
