"""Early rejection in a real vLLM engine against the plain-HF oracle, on a tiny model with a neural PRM."""

import gc
import json

import pytest
import torch

from flopwise.ledger import FlopModel
from flopwise.prm import confidence, in_engine, load_prm, self_head
from flopwise.prm.hf import save_head
from flopwise.techniques.early_rejection import EarlyRejectionConfig, newline_ids, reference_generate

pytestmark = pytest.mark.slow
SEED, TEMPERATURE, MAX_TOKENS = 1234, 1.0, 24


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from flopwise_serve.offline import LLM

    base = tiny_model("llama-gqa")
    d = FlopModel.from_pretrained(base).spec.hidden
    # A random head: scores differ from candidate to candidate, so which ones survive depends on their tokens.
    head = save_head(
        tmp_path_factory.mktemp("prm") / "head",
        base,
        torch.randn(d, generator=torch.Generator().manual_seed(1)),
        torch.zeros(1),
        dtype="float32",
    )
    # A random self head on the generator's own hidden states (its config names the tiny model).
    self_dir = self_head.save(
        tmp_path_factory.mktemp("self") / "head",
        FlopModel.from_pretrained(base).spec.architecture,
        d,
        torch.randn(d, generator=torch.Generator().manual_seed(2)),
        torch.zeros(1),
    )
    llm = LLM(base, dtype="float32", max_model_len=512, max_num_seqs=16, seed=0)
    yield llm, base, {"head": str(head), "self": f"self:{self_dir}"}
    llm.shutdown()
    del llm
    gc.collect()


def vllm_cpu_sampler(seed: int, temperature: float):
    """vLLM's CPU sampling for seeded requests (child i gets seed + i): one draw from the request's generator
    per sampled token seeds a fused Gumbel-max over the temperature-scaled logits."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    generators: dict[int, torch.Generator] = {}

    def sample(i: int, logits: torch.Tensor) -> int:
        g = generators.setdefault(i, torch.Generator().manual_seed(seed + i))
        s = torch.randint(0, 2**31, (1,), generator=g, dtype=torch.long)
        return int(torch.ops._C.fused_gumbel_argmax((logits / temperature).float()[None].contiguous(), s)[0])

    return sample


def run_both(setup, config: EarlyRejectionConfig, n: int = 6, logprobs: int | None = None):
    """The same seeded n-candidate request through the engine and through the oracle."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    llm, base, _ = setup
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode("def add(a, b):\n    return")
    params = SamplingParams(
        n=n,
        temperature=TEMPERATURE,
        seed=SEED,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=logprobs,
        extra_args={"early_rejection": config.model_dump_json()},
    )
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ref = reference_generate(
        model,
        prompt_ids,
        tok.decode(prompt_ids),
        n,
        config,
        None if in_engine(config.prm) else load_prm(config.prm),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        max_tokens=MAX_TOKENS,
        eos_ids=set(),
        sample=vllm_cpu_sampler(SEED, TEMPERATURE),
        newlines=newline_ids(tok),
        head=self_head.load(config.prm) if self_head.is_self(config.prm) else None,
    )
    return out, ref, prompt_ids


def assert_same(out, ref, n: int) -> dict:
    """Engine = oracle: tokens, who was rejected where, checkpoints, scores; -> the engine's payload."""
    payload = out.ec_transfer_params["flopwise"]
    stats = payload["early_rejection"]
    engine = {c.index: c for c in out.outputs}
    assert len(engine) == n
    for i, cand in enumerate(ref.candidates):
        assert list(engine[i].token_ids) == cand.tokens, f"candidate {i}"
        assert (engine[i].stop_reason == "early_rejection") == (cand.rejected_at is not None)
    assert {int(k): v for k, v in stats["rejected_at"].items()} == {
        i: c.rejected_at for i, c in enumerate(ref.candidates) if c.rejected_at is not None
    }
    assert len(ref.rejected) > 0 and stats["rejected"] == len(ref.rejected)
    assert stats["checkpoints"] == ref.checkpoints
    for i, c in enumerate(ref.candidates):
        if c.score is None:  # stopped by accept before its first checkpoint (or before it started)
            assert str(i) not in stats["scores"]
        else:
            assert stats["scores"][str(i)] == pytest.approx(c.score, abs=1e-4)
    assert payload["total"] == payload["prompt"] + payload["completion"] + payload["prm"]
    return payload


@pytest.mark.parametrize("every,steps,keep,min_keep", [(4, None, 0.5, 1), (3, None, 0.6, 2), (6, 1, 0.5, 1)])
def test_engine_rejects_what_the_oracle_rejects(setup, every, steps, keep, min_keep):
    llm, base, prms = setup
    config = EarlyRejectionConfig(
        prm=prms["head"], every_tokens=every, every_steps=steps, keep=keep, min_keep=min_keep
    )
    n = 6
    out, ref, prompt_ids = run_both(setup, config, n)
    tok = llm.get_tokenizer()
    if steps:  # the random model does write newlines, so some checkpoints come from steps, not the token cap
        assert any(t in newline_ids(tok) for c in ref.candidates for t in c.tokens)
    payload = assert_same(out, ref, n)
    # every PRM pass is charged (each candidate's KV kept between its checkpoints, as the oracle's), and the
    # total is generation + PRM; the time the engine waited for the PRM is reported
    assert payload["prm"] == ref.prm_flops > 0
    assert payload["early_rejection"]["prm_s"] > 0
    ledger = FlopModel.from_pretrained(base)
    P = len(prompt_ids)
    generated = sum(len(c.tokens) for c in ref.candidates)
    # each candidate prefills the prompt (the prompt is shorter than a KV block, so nothing is shared) and
    # decodes all but its last token
    expected = sum(
        ledger.forward(P, 0, logits=1).total
        + sum(ledger.forward(1, P + t, logits=1).total for t in range(len(c.tokens) - 1))
        for c in ref.candidates
    )
    assert payload["prompt"] + payload["completion"] == expected
    assert sum(len(c.token_ids) for c in out.outputs) == generated < n * MAX_TOKENS


@pytest.mark.parametrize(
    "scorer,rule",
    [
        ("head", "threshold"),
        ("confidence", "percentile"),
        ("confidence:tail", "margin"),
        ("self", "threshold"),
    ],
)
def test_keep_rules_equal_the_oracle(setup, scorer, rule):
    """Each score rule once, each scorer once (the fraction rule is the test above). The threshold and the
    margin are read off the first checkpoint's scores (a percentile run: the candidates' tokens up to it
    do not depend on the rule), so that each rule rejects some and spares some. A self head scores 0.5 until
    a candidate's first line ends, so its threshold is the median final score of a run without rejection
    (the lowest over a candidate's lines: those below it fell below at some line)."""
    _, base, prms = setup
    prm = prms.get(scorer, scorer)
    base_config = dict(prm=prm, every_tokens=4, confidence_window=3, min_keep=2)
    warm = EarlyRejectionConfig(**base_config, **({"keep": 1.0} if scorer == "self" else {"percentile": 50}))
    n = 6
    out, ref, _ = run_both(setup, warm, n)
    if scorer == "self":
        cut = sorted(c.score for c in ref.candidates)[n // 2]
    else:
        cut = warm.warmup_cut(ref.first_scores)
    rules = {
        "percentile": lambda: {"percentile": 50},
        "threshold": lambda: {"threshold": cut},
        "margin": lambda: {"margin": max(ref.first_scores) - cut},
    }
    config = EarlyRejectionConfig(**base_config, **rules[rule]())
    if rule != "percentile":
        out, ref, _ = run_both(setup, config, n)
    payload = assert_same(out, ref, n)
    assert 0 < len(ref.rejected) < n
    ledger = FlopModel.from_pretrained(base)
    generated = sum(len(c.tokens) for c in ref.candidates)
    if scorer.startswith("confidence"):
        # confidence costs a log-softmax per generated token, nothing else; no logprobs reach the client
        assert payload["prm"] == generated * confidence.flops_per_token(ledger.spec.vocab, 20)
        assert all(c.logprobs is None for c in out.outputs)
    if scorer == "self":  # a dot product per generated token
        assert payload["prm"] == ref.prm_flops == generated * 2 * ledger.spec.hidden


@pytest.mark.parametrize("scorer", ["head", "confidence"])  # the tiny model ends too few lines for self:
def test_width_and_accept_equal_the_oracle(setup, scorer):
    """``width: 2`` runs the candidates two at a time, each scored at its own checkpoints; ``accept`` ends the
    request at the first finished candidate that scores that high. The threshold lies just above the lowest
    checkpoint score of the weaker of the first two candidates in a run without it, so it rejects that one;
    ``accept`` is the score of the first candidate to finish in a run with the threshold, so that every rule
    fires."""
    _, base, prms = setup
    n, common = 8, dict(prm=prms.get(scorer, scorer), every_tokens=4, width=2, confidence_window=3)
    _, free, _ = run_both(setup, EarlyRejectionConfig(**common), n)
    assert free.checkpoints > 0 and not free.rejected
    low = min(free.lowest[0], free.lowest[1])  # the weaker of the first two at its worst checkpoint
    threshold = (low + min(v for v in free.lowest.values() if v > low)) / 2
    _, thr, _ = run_both(setup, EarlyRejectionConfig(**common, threshold=threshold), n)
    accept = thr.candidates[thr.finish_order[0]].score
    config = EarlyRejectionConfig(**common, threshold=threshold, accept=accept)
    out, ref, prompt_ids = run_both(setup, config, n)
    payload = assert_same(out, ref, n)
    stats = payload["early_rejection"]
    # rejected below the threshold, then the accepted answer stopped the rest; some never started
    assert any(c.rejected_at for c in ref.candidates) and stats["never_started"] > 0
    assert ref.candidates[stats["accepted"]].score >= accept and stats["accepted"] in ref.finish_order
    # only the started candidates cost anything: each prefills the prompt (shorter than a block, so
    # nothing is shared) and decodes all but its last token
    ledger = FlopModel.from_pretrained(base)
    P = len(prompt_ids)
    expected = sum(
        ledger.forward(P, 0, logits=1).total
        + sum(ledger.forward(1, P + t, logits=1).total for t in range(len(c.tokens) - 1))
        for c in ref.candidates
        if c.tokens
    )
    assert payload["prompt"] + payload["completion"] == expected
    if scorer == "confidence":  # a log-softmax per generated token
        generated = sum(len(c.tokens) for c in ref.candidates)
        assert payload["prm"] == generated * confidence.flops_per_token(ledger.spec.vocab, 20)
    else:
        assert payload["prm"] == ref.prm_flops > 0


def test_confidence_gives_the_client_the_logprobs_it_asked_for(setup):
    config = EarlyRejectionConfig(prm="confidence", every_tokens=4, keep=0.5)
    out, ref, _ = run_both(setup, config, 4, logprobs=2)
    assert_same(out, ref, 4)
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(len(pos) in (2, 3) for pos in c.logprobs)  # top 2, plus the sampled one if not in them


def test_keep_one_is_best_of_n_with_final_scores(setup):
    from vllm import SamplingParams

    llm, _, prms = setup
    config = EarlyRejectionConfig(prm=prms["head"], every_tokens=2, keep=1.0)
    params = SamplingParams(
        n=4,
        temperature=1.0,
        max_tokens=10,
        ignore_eos=True,
        extra_args={"early_rejection": config.model_dump_json()},
    )
    out = llm.generate(["x = 1\n"], params)[0]
    stats = out.ec_transfer_params["flopwise"]["early_rejection"]
    assert stats["rejected"] == 0 and stats["checkpoints"] == 0
    assert sorted(stats["scores"]) == ["0", "1", "2", "3"]  # each finished candidate got a final score
    assert all(len(c.token_ids) == 10 for c in out.outputs)


def test_prm_failing_at_run_time_serves_without_rejection(setup, tmp_path):
    from vllm import SamplingParams

    llm, base, _ = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    # no head.safetensors
    (broken / "flopwise_prm.json").write_text(json.dumps({"type": "head", "base": base}))
    config = EarlyRejectionConfig(prm=str(broken), every_tokens=2, keep=0.5)
    params = SamplingParams(
        n=4,
        temperature=1.0,
        max_tokens=8,
        ignore_eos=True,
        extra_args={"early_rejection": config.model_dump_json()},
    )
    out = llm.generate(["x = 1\n"], params)[0]
    stats = out.ec_transfer_params["flopwise"]["early_rejection"]
    assert "PRM failed" in stats["error"] and stats["rejected"] == 0
    assert [len(c.token_ids) for c in out.outputs] == [8, 8, 8, 8]
    # the engine is fine afterwards
    assert (
        len(llm.generate(["y"], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3
    )


def test_prm_pass_that_would_cross_the_budget_is_skipped(setup):
    """The PRM's passes are charged like any other work: one that would cross the group's flop_budget is not
    run, rejection stays off for that request, and the charge never crosses the budget. Here the budget
    covers the generation exactly, so the first candidate's final score (a head pass over prompt + answer) is
    the pass that does not fit."""
    from vllm import SamplingParams

    llm, base, prms = setup
    head = prms["head"]
    ledger = FlopModel.from_pretrained(base)
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode("def add(a, b):\n    return a + b\n")
    n, tokens = 4, 6
    budget = n * ledger.request(len(prompt_ids), tokens).total
    config = EarlyRejectionConfig(prm=head, every_tokens=64, keep=0.5)
    params = SamplingParams(
        n=n,
        temperature=1.0,
        seed=5,
        max_tokens=tokens,
        ignore_eos=True,
        extra_args={"early_rejection": config.model_dump_json(), "flop_budget": budget},
    )
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params)[0]
    payload = out.ec_transfer_params["flopwise"]
    stats = payload["early_rejection"]
    assert stats["error"].startswith("skipped") and "flop_budget" in stats["error"], stats
    assert stats["scores"] == {} and payload["prm"] == 0 and payload["total"] == budget
    assert [len(c.token_ids) for c in out.outputs] == [tokens] * n  # every candidate served in full


def test_seeded_requests_through_chunked_prefill_sample_as_the_oracle(setup):
    """More prompt tokens than one step's budget: some seeded prompt is prefilled in chunks. Stock vLLM-CPU's
    runner rewinds its generator with a CUDA-only call there and the engine dies; flopwise's worker restores
    it (flopwise_vllm.seeded), so every request samples what the seeded plain-HF oracle samples."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    llm, base, _ = setup
    budget = llm.engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    count = 16
    length = min(480, budget // count * 2 + 7)  # the 16 prompts need about two steps' budget, not a multiple
    prompts = [[(7 * i + 3 * k) % 1900 + 20 for i in range(length)] for k in range(count)]
    assert count * length > budget
    params = [
        SamplingParams(temperature=TEMPERATURE, seed=SEED + k, max_tokens=6, ignore_eos=True)
        for k in range(count)
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for k, (prompt, out) in enumerate(zip(prompts, outs)):
        sample = vllm_cpu_sampler(SEED + k, TEMPERATURE)
        ids, expected = list(prompt), []
        with torch.no_grad():
            for _ in range(6):
                expected.append(sample(0, model(input_ids=torch.tensor([ids])).logits[0, -1].float()))
                ids.append(expected[-1])
        assert list(out.outputs[0].token_ids) == expected, f"prompt {k}"


def test_step_count_is_per_candidate_and_survives_a_shorter_list():
    """The checkpoint test counts a candidate's step ends incrementally (only its new tokens each step)."""
    from flopwise_vllm.rejection_state import Rejection

    rej = Rejection(EarlyRejectionConfig(prm="verifier:arithmetic", every_steps=1), group=None)
    newline = frozenset({5})
    assert rej.steps(0, [1, 5, 2], newline) == 1
    assert rej.steps(0, [1, 5, 2, 5, 7, 5], newline) == 3
    assert rej.steps(1, [5], newline) == 1  # another candidate: its own count
    assert rej.steps(0, [5, 2], newline) == 1  # fewer tokens than counted: recounted from the start
