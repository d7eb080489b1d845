"""A seeded request whose prompt is prefilled in chunks: vLLM's CPU runner rewinds the request's generator
with a CUDA-only call and the engine dies; flopwise's worker makes it sample as an unchunked prefill does."""

import gc

import pytest

pytestmark = pytest.mark.slow


def test_seeded_request_with_chunked_prefill_samples_as_without(tiny_model):
    from vllm import SamplingParams

    from flopwise_serve.offline import LLM

    base = tiny_model("llama-gqa")
    prompts = [{"prompt_token_ids": [(7 * i + 3 * k) % 1900 + 20 for i in range(300)]} for k in (1, 2)]
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    tokens = {}
    for budget in (128, 1024):  # two 300-token prompts: prefilled in chunks of 128, or at once
        llm = LLM(base, dtype="float32", max_model_len=512, max_num_batched_tokens=budget, seed=0)
        tokens[budget] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        llm.shutdown()
        del llm
        gc.collect()
    assert tokens[128] == tokens[1024]
    assert all(len(t) == 12 for t in tokens[128]) and tokens[128][0] != tokens[128][1]
