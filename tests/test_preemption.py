"""Preemption, forced by a KV pool too small for the batch: the recompute is charged exactly, KV dropping
starts over, and early rejection still rejects what the oracle rejects. Nothing leaks: the pool's free
blocks return to their start value."""

import gc

import pytest
import torch

from flopwise.ledger import FlopModel

pytestmark = pytest.mark.slow
BS = 32


@pytest.fixture(scope="module")
def engine(tiny_model):
    import os

    from flopwise_serve.offline import LLM

    path = tiny_model("llama-gqa")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, to watch it preempt
    try:
        # 14 blocks of 32 tokens: two 190-token requests fit, four do not. No prefix cache: a preempted
        # request recomputes everything, so its extra cost is exact.
        llm = LLM(
            path,
            dtype="float32",
            max_model_len=384,
            block_size=BS,
            num_gpu_blocks_override=14,
            max_num_seqs=8,
            max_num_batched_tokens=2048,
            enable_prefix_caching=False,
            seed=0,
        )
    finally:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted = []  # (request id, tokens computed, tokens in all) at each preemption
    real = scheduler._preempt_request

    def record(request, *args, **kwargs):
        preempted.append((request.request_id, request.num_computed_tokens, request.num_tokens))
        return real(request, *args, **kwargs)

    scheduler._preempt_request = record  # the test's own probe on this one instance
    yield llm, FlopModel.from_pretrained(path), scheduler, preempted, path
    llm.shutdown()
    del llm
    gc.collect()


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 1900, (n,), generator=g).tolist()


def _greedy(n, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra or None)


def _free(scheduler) -> int:
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def test_recompute_after_preemption_is_charged_exactly(engine):
    llm, ledger, scheduler, preempted, _ = engine
    start = _free(scheduler)
    prompts = [{"prompt_token_ids": _prompt(60, seed)} for seed in range(4)]
    # one at a time: 6 blocks each, no preemption
    alone = [llm.generate([p], _greedy(130))[0] for p in prompts]
    assert not preempted
    together = llm.generate(prompts, _greedy(130))
    assert preempted, "the pool was meant to force preemption"
    by_id = {o.request_id: o for o in together}
    for a, t in zip(alone, together):
        assert t.outputs[0].token_ids == a.outputs[0].token_ids  # recompute changes no token
        charge = t.ec_transfer_params["flopwise"]
        # the engine's own id
        extra = sum(
            ledger.forward(total, start=0, logits=1).total
            - ledger.forward(total - done, start=done, logits=1).total
            for rid, done, total in preempted
            if rid == charge["group"]
        )
        assert charge["total"] == a.ec_transfer_params["flopwise"]["total"] + extra
        # no technique on: recompute is real work, not saved
        assert charge["dense_baseline"] == charge["total"]
    assert len(by_id) == 4 and _free(scheduler) == start
    preempted.clear()


@pytest.mark.parametrize(
    "policy,kv",
    [
        ("knorm", {"kv_keep": 0.25}),
        ("snapkv", {"kv_keep_tokens": 96}),
        pytest.param("knorm", {"kv_keep_tokens": 96}, marks=pytest.mark.long),
    ],
)
def test_kv_dropping_starts_over_after_preemption(engine, policy, kv):
    """A preempted request with KV dropping recomputes its prompt and output and drops again: its KV layout is
    reset and fixed anew, the emptied blocks go back, the charge says what was kept. Under a token budget
    it re-scores while decoding before and after the preemption. Its tokens are the oracle's told where the
    engine preempted it (it rebuilds its cache as vLLM recomputes it)."""
    from transformers import AutoModelForCausalLM

    from flopwise.hf import kv as hk
    from flopwise.techniques import kv_drop as kd

    llm, ledger, scheduler, preempted, path = engine
    start = _free(scheduler)
    ids = _prompt(200, 31)
    others = [{"prompt_token_ids": _prompt(60, seed)} for seed in (40, 41, 42)]
    params = [_greedy(150)] * 3 + [_greedy(150, kv_policy=policy, **kv)]  # the newest: preempted first
    outs = llm.generate([*others, {"prompt_token_ids": ids}], params)[::-1]
    kv_req = outs[0].ec_transfer_params["flopwise"]["group"]
    at = tuple(total for rid, _, total in preempted if rid == kv_req)
    assert at, "the pool was meant to preempt the dropping request"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = kd.parse_options(policy, kv.get("kv_keep"), kv.get("kv_keep_tokens"))
    ref = hk.generate(hf, ids, config, 150, BS, preempted=at)
    assert list(outs[0].outputs[0].token_ids) == ref.tokens
    stats = outs[0].ec_transfer_params["flopwise"]["kv"]
    assert stats["prompt_tokens"] == 200 and stats["dropped_tokens"] == ref.layout.dropped_tokens
    if "kv_keep_tokens" in kv:  # re-scored after the preemption too
        assert ref.compactions and stats["compactions"] >= 1
    assert _free(scheduler) == start
    preempted.clear()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("hog_first", [False, True])
def test_early_rejection_holds_and_rejects_under_preemption(engine, tmp_path, hog_first):
    """Candidates held at a checkpoint keep their blocks while siblings (and other requests) run, some get
    preempted: the candidates rejected, and every token, are still the oracle's. With the hog queued first
    it takes the blocks the unstarted siblings need, then preempts itself, and nothing can run: the held
    candidates give their blocks up and wait at the checkpoint (this hung before)."""
    from test_early_rejection import vllm_cpu_sampler
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from flopwise.prm import load_prm
    from flopwise.prm.hf import save_head
    from flopwise.techniques.early_rejection import EarlyRejectionConfig, newline_ids, reference_generate

    llm, ledger, scheduler, preempted, path = engine
    start = _free(scheduler)
    head = save_head(
        tmp_path / "head",
        path,
        torch.randn(ledger.spec.hidden, generator=torch.Generator().manual_seed(2)),
        torch.zeros(1),
        dtype="float32",
    )
    config = EarlyRejectionConfig(prm=str(head), every_tokens=24, keep=0.5)
    tok = llm.get_tokenizer()
    prompt_ids = _prompt(40, 50)
    n, max_tokens, seed = 6, 72, 99
    params = SamplingParams(
        n=n,
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        ignore_eos=True,
        extra_args={"early_rejection": config.model_dump_json()},
    )
    hog = {"prompt_token_ids": _prompt(160, 51)}
    if hog_first:
        outs = llm.generate([hog, {"prompt_token_ids": prompt_ids}], [_greedy(120), params])[::-1]
    else:
        outs = llm.generate([{"prompt_token_ids": prompt_ids}, hog], [params, _greedy(120)])
    assert preempted
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = reference_generate(
        model,
        prompt_ids,
        tok.decode(prompt_ids),
        n,
        config,
        load_prm(str(head)),
        decode=lambda x: tok.decode(x, skip_special_tokens=True),
        max_tokens=max_tokens,
        eos_ids=set(),
        sample=vllm_cpu_sampler(seed, 1.0),
        newlines=newline_ids(tok),
    )
    engine_out = {c.index: c for c in outs[0].outputs}
    for i, cand in enumerate(ref.candidates):
        assert list(engine_out[i].token_ids) == cand.tokens, f"candidate {i}"
    stats = outs[0].ec_transfer_params["flopwise"]["early_rejection"]
    assert stats["rejected"] == len(ref.rejected) > 0 and stats["checkpoints"] == ref.checkpoints
    assert _free(scheduler) == start
    preempted.clear()
