"""KV token dropping: the policies, the paged layout, and vLLM against the transformers reference."""

import gc

import pytest
import torch

from flopwise.ledger import FlopModel
from flopwise.techniques import kv_drop as kd

BS = 32  # the smallest block size the CPU attention kernel takes
POLICIES = ["streaming_llm", "snapkv", "tova", "h2o", "knorm", "random"]


def _prompt(n: int, seed: int = 7) -> list[int]:
    return [(seed * i + 3) % 1900 + 20 for i in range(n)]


# -- core ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt,keep,protected,expect",
    [
        # 300 tokens = 9 full blocks + 12 in the tail; 25% = 75 tokens: 63 from the region -> 2 blocks (64)
        (300, 0.25, 0, dict(full=9, kept=2, dropped_tokens=224, kept_tokens=76)),
        (300, 0.5, 0, dict(full=9, kept=5, dropped_tokens=128, kept_tokens=172)),
        # 8 protected blocks hold more than 25% already: the whole region [8, 9) goes
        (300, 0.25, 8, dict(full=9, kept=0, dropped_tokens=32, kept_tokens=268)),
        (300, 1.0, 0, dict(full=9, kept=9, dropped_tokens=0, kept_tokens=300)),
        (
            40,
            0.1,
            0,
            dict(full=1, kept=1, dropped_tokens=0, kept_tokens=40),
        ),  # snapkv keeps its 64-token window
    ],
)
def test_layout(prompt, keep, protected, expect):
    lay = kd.layout(kd.parse_options("snapkv", keep), prompt, BS, protected)
    assert {k: getattr(lay, k) for k in expect} == expect
    assert lay.active == (expect["dropped_tokens"] > 0)
    assert lay.region == (min(protected, lay.full) * BS, lay.full * BS)


def test_token_budget_layout_and_policy_minimum():
    lay = kd.layout(kd.parse_options("streaming_llm", tokens=100), 1000, BS)
    assert lay.kept_tokens >= 100 and lay.kept_tokens - 100 < BS  # whole blocks, rounded up
    # a ratio below what the policy needs is raised to it; a token budget below it is refused
    assert kd.layout(kd.parse_options("snapkv", 0.01), 1000, BS).kept_tokens >= 64


@pytest.mark.parametrize(
    "args,field",
    [
        (dict(policy="lru"), "kv_policy"),
        (dict(policy=["snapkv"]), "kv_policy"),
        (dict(keep=0), "kv_keep"),
        (dict(keep=1.5), "kv_keep"),
        (dict(keep="0.5"), "kv_keep"),
        (dict(keep=True), "kv_keep"),
        (dict(keep=float("nan")), "kv_keep"),
        (dict(tokens=0), "kv_keep_tokens"),
        (dict(tokens=2.5), "kv_keep_tokens"),
        (dict(policy="snapkv", tokens=32), "kv_keep_tokens"),  # below its 64-token window
        (dict(policy="streaming_llm", tokens=4), "kv_keep_tokens"),  # only its sinks
        (dict(keep=0.5, tokens=100), "kv_keep_tokens"),
    ],
)
def test_bad_options_name_the_field(args, field):
    with pytest.raises(kd.KVDropError) as e:
        kd.parse_options(**args)
    assert e.value.field == field and field in str(e.value)


def test_server_defaults_apply_to_requests_that_set_none():
    from flopwise.options import Defaults, parse

    assert parse({}).kv is None
    defaults = Defaults(kv_policy="knorm", kv_keep=0.25)
    assert parse({}, defaults).kv == kd.KVDropConfig(policy="knorm", keep=0.25)
    assert parse({"kv_keep_tokens": 128}, defaults).kv.tokens == 128  # a request's own choice wins
    assert parse({"kv_keep": 1.0}, defaults).kv is None  # and can turn it off


def _ctx(keys, queries=None, start=0, end=None, offset=0):
    return kd.KVContext(
        keys=keys,
        queries=queries,
        start=start,
        end=keys.shape[0] + offset if end is None else end,
        offset=offset,
    )


def test_streaming_llm_keeps_sinks_and_recent():
    keys = torch.randn(100, 2, 8)
    idx = kd.keep_indices(kd.get_policy("streaming_llm"), _ctx(keys, end=96), 20)
    expect = list(range(4)) + list(range(80, 96))
    assert idx.tolist() == [expect, expect]


def test_knorm_keeps_the_smallest_keys_per_head():
    keys = torch.ones(64, 2, 8)
    keys[[3, 10, 20], 0] *= 0.1
    keys[[5, 6, 7], 1] *= 0.1
    idx = kd.keep_indices(kd.get_policy("knorm"), _ctx(keys, offset=32, start=32, end=96), 3)
    assert idx.tolist() == [[35, 42, 52], [37, 38, 39]]  # absolute positions, per head


def test_snapkv_keeps_what_the_window_attends_to():
    torch.manual_seed(0)
    keys = torch.randn(200, 1, 16) * 0.1
    queries = torch.randn(64, 2, 16) * 0.1
    keys[50, 0] = queries.mean((0, 1)) * 200  # a key every window query points at
    policy = kd.get_policy("snapkv")
    idx = kd.keep_indices(policy, _ctx(keys, queries, end=128), 5)[0].tolist()
    assert 50 in idx and idx == sorted(idx)
    assert set(range(48, 53)) <= set(kd.keep_indices(policy, _ctx(keys, queries, end=200), 69)[0].tolist())
    assert set(range(136, 200)) <= set(kd.keep_indices(policy, _ctx(keys, queries, end=200), 69)[0].tolist())


def test_h2o_normalises_by_how_many_queries_saw_a_token():
    keys = torch.zeros(10, 1, 4)  # uniform attention: each query spreads 1 over what it sees
    scores = kd.get_policy("h2o").score(_ctx(keys, torch.zeros(10, 1, 4)))
    received = torch.tensor([sum(1 / (q + 1) for q in range(p, 10)) for p in range(10)])
    assert torch.allclose(scores[0], received / torch.arange(10, 0, -1))


@pytest.mark.parametrize("P, W", [(300, 300), (300, 70), (300, 1)])
def test_window_attention_is_the_causal_softmax_summed_over_the_window(P, W):
    torch.manual_seed(P + W)
    keys, queries = torch.randn(P, 2, 8), torch.randn(W, 6, 8)
    k = keys.repeat_interleave(3, dim=1)  # [P, Hq, d]: each query head's KV head
    logits = torch.einsum("whd,phd->hwp", queries, k) / 8**0.5
    pos = torch.arange(P - W, P)
    logits.masked_fill_(torch.arange(P)[None, None, :] > pos[None, :, None], float("-inf"))
    want = torch.softmax(logits, dim=-1).sum(1).reshape(2, 3, P).mean(1)
    assert torch.allclose(kd.window_attention(keys, queries), want, atol=1e-5)


def test_h2o_reads_its_window_of_queries():
    policy = kd.get_policy("h2o")
    assert policy.query_window == 256 and policy.decode_window == 64
    torch.manual_seed(0)
    keys, queries = torch.randn(400, 1, 4), torch.randn(400, 1, 4)
    full = kd.KVContext(keys, policy.queries_of(queries), 0, 400)
    seen = torch.arange(400, 0, -1).clamp(max=256)
    assert full.queries.shape[0] == 256
    assert torch.allclose(policy.score(full)[0], kd.window_attention(keys, queries[-256:])[0] / seen)


def test_query_ring_keeps_the_newest_queries_in_order():
    from flopwise_vllm.kv_state import QueryRing

    rows = torch.arange(200.0).reshape(200, 1, 1)
    ring, pushed = QueryRing(64, rows[:1]), 0
    for n in (5, 1, 1, 70, 1, 30, 64, 1, 27):
        ring.push(rows[pushed : pushed + n])
        pushed += n
        for w in (1, 20, 64):
            assert torch.equal(ring.last(w), rows[max(0, pushed - 64) : pushed][-w:])


def test_random_is_seeded_per_layer():
    keys = torch.randn(64, 2, 8)
    policy = kd.get_policy("random")
    a, b = (kd.keep_indices(policy, kd.KVContext(keys, None, 0, 64, layer=layer), 16) for layer in (0, 1))
    assert torch.equal(a, kd.keep_indices(policy, kd.KVContext(keys, None, 0, 64, layer=0), 16))
    assert not torch.equal(a, b)


def test_scoring_flops():
    assert kd.get_policy("snapkv").scoring_flops(1000, 9, 64) == 2 * 9 * 64 * 64 * 1000
    # h2o: its last 256 queries, each over the keys up to it (the first over 745, the last over 1000)
    assert kd.get_policy("h2o").scoring_flops(1000, 9, 64) == 2 * 9 * 64 * sum(range(745, 1001))
    assert kd.get_policy("h2o").scoring_flops(100, 9, 64) == 2 * 9 * 64 * 100 * 101 // 2
    assert kd.get_policy("knorm").scoring_flops(1000, 9, 64) == 0


def test_ledger_charges_decode_on_the_kept_context(tiny_model):
    ledger = FlopModel.from_pretrained(tiny_model("llama-gqa"))
    full, cut = ledger.request(300, 10), ledger.request(300, 10, kv_dropped=224)
    assert full.prefill.total == cut.prefill.total
    attn = 4 * sum(layer.q_heads * layer.head_dim for layer in ledger.spec.layers)
    assert full.decode.flops["attention"] - cut.decode.flops["attention"] == attn * 9 * 224
    assert {k: v for k, v in full.decode.flops.items() if k != "attention"} == {
        k: v for k, v in cut.decode.flops.items() if k != "attention"
    }


# -- the HF reference ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama-gqa")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_reference_without_drop_is_plain_greedy(hf):
    from flopwise.hf import kv as hk

    ids = _prompt(300)
    plain = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 300:].tolist()
    assert hk.generate(hf, ids, None, 8, BS).tokens == plain
    run = hk.generate(hf, ids, kd.parse_options("knorm", 0.25), 8, BS)
    assert [k.shape for k in run.kept] == [(2, 64)] * 2  # per layer: [kv heads, kept region tokens]


# -- vLLM --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("isa,block_size,head_dim", [("vec", 32, 64), ("vec16", 16, 48), ("vec", 128, 64)])
def test_read_cache_reads_back_what_the_kernel_wrote(isa, block_size, head_dim):
    """Prefix-cache hits are read back from vLLM's CPU cache (keys are stored transposed per block): what
    the kernel's own writer put in blocks 3, 0, 2 (in that order) comes back in that order."""
    from vllm import _custom_ops as ops

    from flopwise_vllm.kv_cache_io import caches, read_cache

    heads, n = 2, 3 * block_size
    cache = torch.zeros(4, heads, block_size, 2 * head_dim)
    k, v = torch.randn(n, heads, head_dim), torch.randn(n, heads, head_dim)
    order = torch.tensor([3, 0, 2])
    slots = (order.repeat_interleave(block_size) * block_size + torch.arange(n) % block_size).long()
    key_cache, value_cache = caches(cache)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, 1.0, 1.0, "auto")
    got_k, got_v = read_cache(cache, order, isa)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(ValueError, match="amx"):
        read_cache(cache, order, "amx")


@pytest.fixture(scope="module")
def engine(tiny_model):
    from flopwise_serve.offline import LLM
    from flopwise_vllm.forcing import ForcedContinuation

    path = tiny_model("llama-gqa")
    # 128-token steps: a 300-token prompt prefills in three chunks (the worker stashes the first two).
    # 33 blocks of 32 = one 1024-token request: the pool is tight enough that freed blocks must be reused.
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=1024,
        block_size=BS,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        num_gpu_blocks_override=33,
        seed=0,
        enforce_eager=True,
        logits_processors=[ForcedContinuation],
    )
    yield llm, FlopModel.from_pretrained(path)
    llm.shutdown()
    del llm
    gc.collect()


def _greedy(n: int, **kv):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=kv or None)


def _hit(policy: str, prompt: int) -> int:
    """The prefix-cache hit a request that drops may read: never its policy's query window."""
    window = kd.get_policy(policy).query_window
    return 0 if window is None else min(prompt - 1, prompt - window) // BS * BS


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_engine_keeps_what_the_reference_keeps(engine, hf, keep):
    """Every policy: vLLM's tokens equal the HF reference's on the same kept positions, and the charge is
    the ledger's with decode attention on the kept context plus the policy's scoring. The first request
    computes the prompt; a drop copies its kept tokens to fresh blocks, so the prompt stays cached and
    every later policy reads it from the prefix cache (all but its query window)."""
    from flopwise.hf import kv as hk

    llm, ledger = engine
    ids = _prompt(300, seed=7 if keep == 0.5 else 19)
    one_logit_row = 2 * ledger.spec.hidden * ledger.spec.vocab  # per extra prefill chunk
    tokens = []
    for i, policy in enumerate(POLICIES):
        out = llm.generate([{"prompt_token_ids": ids}], _greedy(12, kv_policy=policy, kv_keep=keep))[0]
        hit = 0 if i == 0 else _hit(policy, 300)
        assert (out.num_cached_tokens or 0) == hit, policy
        ref = hk.generate(hf, ids, kd.parse_options(policy, keep), 12, BS)
        assert list(out.outputs[0].token_ids) == ref.tokens, policy
        tokens.append(ref.tokens)
        lay, charge = ref.layout, out.ec_transfer_params["flopwise"]
        assert charge["kv"] == {
            "prompt_tokens": 300,
            "kept_tokens": lay.kept_tokens,
            "dropped_tokens": lay.dropped_tokens,
            "dropped_blocks": lay.dropped_blocks,
        }
        scoring = sum(
            kd.get_policy(policy).scoring_flops(300, layer.q_heads, layer.head_dim)
            for layer in ledger.spec.layers
        )
        chunks = -(-(300 - hit) // 128)
        expect = ledger.request(300, 12, cached_tokens=hit, kv_dropped=lay.dropped_tokens).total
        assert charge["total"] == expect + (chunks - 1) * one_logit_row + scoring, policy
        assert charge["components"].get("kv_scoring", 0) == scoring
    full = llm.generate([{"prompt_token_ids": ids}], _greedy(12))[0]
    assert full.num_cached_tokens == 288  # the first request's blocks, intact
    # the drop really changes what the model attends to
    assert sum(t != list(full.outputs[0].token_ids) for t in tokens) >= 3
    assert list(full.outputs[0].token_ids) == hk.generate(hf, ids, None, 12, BS).tokens


@pytest.mark.slow
def test_a_cached_prompt_is_dropped_again_and_stays_cached(engine, hf):
    """Drop, no drop, drop on one prompt (the shared-document pattern): the second request reads the
    first's prompt from the prefix cache, and the third, whose prompt is then cached, drops exactly as the
    first did (reading the hits, recomputing the query window) and says what the reference says."""
    from flopwise.hf import kv as hk

    llm, ledger = engine
    ids = _prompt(400, seed=23)
    kv = dict(kv_policy="snapkv", kv_keep=0.25)
    first = llm.generate([{"prompt_token_ids": ids}], _greedy(10, **kv))[0]
    plain = llm.generate([{"prompt_token_ids": ids}], _greedy(10))[0]
    third = llm.generate([{"prompt_token_ids": ids}], _greedy(10, **kv))[0]
    assert (first.num_cached_tokens or 0) == 0 and plain.num_cached_tokens == 384
    assert third.num_cached_tokens == _hit("snapkv", 400) == 320  # 400 - 64 queries, in whole blocks
    ref = hk.generate(hf, ids, kd.parse_options("snapkv", 0.25), 10, BS)
    assert list(first.outputs[0].token_ids) == list(third.outputs[0].token_ids) == ref.tokens
    assert list(plain.outputs[0].token_ids) == hk.generate(hf, ids, None, 10, BS).tokens
    a, c = first.ec_transfer_params["flopwise"], third.ec_transfer_params["flopwise"]
    assert a["kv"] == c["kv"] and c["kv"]["dropped_blocks"] == ref.layout.dropped_blocks == 9
    scoring = sum(
        kd.get_policy("snapkv").scoring_flops(400, x.q_heads, x.head_dim) for x in ledger.spec.layers
    )
    assert c["components"]["kv_scoring"] == a["components"]["kv_scoring"] == scoring  # every key, each time
    assert c["total"] == ledger.request(400, 10, cached_tokens=320, kv_dropped=288).total + scoring


@pytest.mark.slow
def test_a_prefix_shared_with_another_request_is_dropped_by_copy(engine, hf):
    """B shares A's first 8 blocks through the prefix cache and drops over its whole prompt: it reads
    A's blocks (and computes its other 200 tokens in two chunks, the first stashed) and never writes them,
    so A, asked again, still hits them and says the same."""
    from flopwise.hf import kv as hk

    llm, _ = engine
    shared = _prompt(256, seed=11)
    a_ids, b_ids = shared + _prompt(44, seed=5), shared + _prompt(200, seed=13)
    a1 = llm.generate([{"prompt_token_ids": a_ids}], _greedy(8))[0]
    b = llm.generate([{"prompt_token_ids": b_ids}], _greedy(8, kv_policy="snapkv", kv_keep=0.25))[0]
    assert b.num_cached_tokens == 256  # its first 8 blocks are A's
    ref = hk.generate(hf, b_ids, kd.parse_options("snapkv", 0.25), 8, BS)
    assert list(b.outputs[0].token_ids) == ref.tokens
    assert b.ec_transfer_params["flopwise"]["kv"]["dropped_blocks"] == ref.layout.dropped_blocks == 10
    a2 = llm.generate([{"prompt_token_ids": a_ids}], _greedy(8))[0]
    assert a2.num_cached_tokens >= 256
    assert a2.outputs[0].token_ids == a1.outputs[0].token_ids


@pytest.mark.slow
def test_freed_blocks_go_to_other_requests_and_are_never_read(engine, hf):
    """B drops 14 of its 19 prompt blocks; C (another prompt, 19 blocks) can only run beside B in the
    33-block pool by taking them, and writes its own KV there. B must still say what the reference says:
    had it read a freed block, it would have read C's keys."""
    from flopwise.hf import kv as hk

    llm, _ = engine
    engine_core = llm.engine.llm_engine
    b_ids, c_ids = _prompt(600, seed=17), _prompt(600, seed=29)
    engine_core.add_request("B", {"prompt_token_ids": b_ids}, _greedy(60, kv_policy="knorm", kv_keep=0.25))
    engine_core.add_request("C", {"prompt_token_ids": c_ids}, _greedy(2))
    finished, outputs = [], {}
    for _ in range(500):
        for out in engine_core.step():
            if out.finished:
                finished.append(out.request_id)
                outputs[out.request_id] = out
        if len(finished) == 2:
            break
    assert finished == ["C", "B"]  # C ran (and finished) while B was still generating
    assert outputs["B"].ec_transfer_params["flopwise"]["kv"]["dropped_blocks"] == 14
    ref = hk.generate(hf, b_ids, kd.parse_options("knorm", 0.25), 60, BS)
    assert list(outputs["B"].outputs[0].token_ids) == ref.tokens


def test_eviction_rule():
    # 300 tokens, budget 128: 4 region blocks kept (+12 tail) = 140, 160 dropped
    lay = kd.layout(kd.parse_options("knorm", tokens=128), 300, BS)
    assert (lay.kept, lay.dropped_tokens) == (4, 160)
    first = [n for n in range(300, 500) if kd.evicts(lay, 0, n, 128)][0]
    second = [n for n in range(300, 500) if kd.evicts(lay, 1, n, 128)][0]
    assert (first, second) == (352, 384)  # block 9 once block 10 is full, then block 10 once 11 is


def _decode_charge(ledger, prompt: int, tokens: int, cut) -> int:
    """The ledger's charge of ``tokens`` greedy tokens after a 300-token prompt prefilled in 3 chunks, each
    decode step at position n attending to n + 1 - cut(n) tokens."""
    one_logit_row = 2 * ledger.spec.hidden * ledger.spec.vocab
    total = ledger.request(prompt, 1).total + 2 * one_logit_row
    for n in range(prompt, prompt + tokens - 1):  # decode steps: n tokens cached, the new one at position n
        total += ledger.forward(1, start=n, logits=1, context=n + 1 - cut(n)).total
    return total


@pytest.mark.slow
def test_token_budget_evicts_while_decoding(engine, hf):
    """StreamingLLM under kv_keep_tokens 128: the prompt is cut to 140 tokens, and generation then evicts
    the oldest tail block each time the kept KV is a block over the budget: at 352 and 384 cached tokens."""
    from flopwise.hf import kv as hk

    llm, ledger = engine
    ids = _prompt(300, seed=23)
    kv = dict(kv_policy="streaming_llm", kv_keep_tokens=128)
    out = llm.generate([{"prompt_token_ids": ids}], _greedy(100, **kv))[0]
    ref = hk.generate(hf, ids, kd.parse_options("streaming_llm", tokens=128), 100, BS)
    assert ref.evicted == 2 and not ref.compactions
    assert list(out.outputs[0].token_ids) == ref.tokens
    charge = out.ec_transfer_params["flopwise"]
    assert charge["kv"] == {
        "prompt_tokens": 300,
        "kept_tokens": 140,
        "dropped_tokens": 160,
        "dropped_blocks": 5,
        "evicted_tokens": 64,
    }
    assert charge["total"] == _decode_charge(ledger, 300, 100, lambda n: 160 + 32 * ((n >= 352) + (n >= 384)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy",
    [
        "snapkv",
        "knorm",
        "h2o",
        pytest.param("tova", marks=pytest.mark.long),
        pytest.param("random", marks=pytest.mark.long),
    ],
)
def test_token_budget_rescores_while_decoding(engine, hf, policy):
    """A scored policy under kv_keep_tokens 128 re-scores its kept context (prompt survivors + generated
    tokens) with its recent queries each time it is a block over the budget, keeps the best (sinks and the
    recent window always) and frees the rest: several times over 140 tokens after a 300-token prompt
    prefilled in three chunks. Tokens, re-scorings and the charge (decode attention on what is kept, each
    re-scoring's QK^T) are the transformers reference's."""
    from flopwise.hf import kv as hk

    llm, ledger = engine
    ids = _prompt(300, seed=71 + POLICIES.index(policy))  # one prompt each: computed cold, in 3 chunks
    out = llm.generate([{"prompt_token_ids": ids}], _greedy(140, kv_policy=policy, kv_keep_tokens=128))[0]
    assert not out.num_cached_tokens
    ref = hk.generate(hf, ids, kd.parse_options(policy, tokens=128), 140, BS)
    assert len(ref.compactions) >= 2 and ref.evicted == 0
    assert list(out.outputs[0].token_ids) == ref.tokens
    charge, lay = out.ec_transfer_params["flopwise"], ref.layout
    assert charge["kv"] == {
        **{"prompt_tokens": 300, "kept_tokens": 140, "dropped_tokens": 160, "dropped_blocks": 5},
        "decode_dropped_tokens": sum(c.dropped_tokens for c in ref.compactions),
        "compactions": len(ref.compactions),
    }

    def cut(n: int) -> int:
        done = [c for c in ref.compactions if c.cached <= n]
        return (done[-1].new_resume - done[-1].new_kept) * BS if done else lay.dropped_tokens

    p = kd.get_policy(policy)
    layers = ledger.spec.layers
    scoring = sum(p.scoring_flops(300, x.q_heads, x.head_dim) for x in layers)
    scoring += sum(
        p.decode_scoring_flops(c.rows, x.q_heads, x.head_dim) for c in ref.compactions for x in layers
    )
    assert charge["components"].get("kv_scoring", 0) == scoring
    assert charge["total"] == _decode_charge(ledger, 300, 140, cut) + scoring
    # the budget holds: after the last re-scoring the request reads about 128 tokens
    last = ref.compactions[-1]
    assert 128 <= last.new_kept * BS + last.cached - last.new_resume * BS < 128 + 2 * BS


@pytest.mark.slow
def test_a_budget_reached_while_decoding_rescores_from_there(engine, hf):
    """A 100-token prompt under a 128-token budget keeps all of it (and says why); generation passes the
    budget and re-scores from then on, every block, as the reference does."""
    from flopwise.hf import kv as hk

    llm, _ = engine
    ids = _prompt(100, seed=83)
    out = llm.generate([{"prompt_token_ids": ids}], _greedy(200, kv_policy="snapkv", kv_keep_tokens=128))[0]
    ref = hk.generate(hf, ids, kd.parse_options("snapkv", tokens=128), 200, BS)
    assert len(ref.compactions) >= 3 and ref.compactions[0].kept == 0
    assert list(out.outputs[0].token_ids) == ref.tokens
    kv = out.ec_transfer_params["flopwise"]["kv"]
    assert (kv["dropped_tokens"], kv["compactions"]) == (0, len(ref.compactions))
    assert kv["decode_dropped_tokens"] == sum(c.dropped_tokens for c in ref.compactions)


@pytest.mark.slow
def test_forced_continuation_logprobs_match_the_reference(engine, hf):
    """Perplexity under a drop: vLLM's log-probabilities of a forced continuation equal the reference's."""
    from vllm import SamplingParams

    from flopwise.hf import kv as hk

    llm, _ = engine
    ids, forced = _prompt(300, seed=37), _prompt(20, seed=41)
    params = SamplingParams(
        max_tokens=20,
        temperature=0,
        logprobs=0,
        extra_args={"kv_policy": "snapkv", "kv_keep": 0.25, "force_tokens": forced},
    )
    out = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    assert list(out.token_ids) == forced
    got = [lp[t].logprob for lp, t in zip(out.logprobs, forced)]
    ref = hk.generate(hf, ids, kd.parse_options("snapkv", 0.25), 20, BS, forced=forced).logprobs
    assert got == pytest.approx(ref, abs=2e-4)
    full = hk.generate(hf, ids, None, 20, BS, forced=forced).logprobs
    assert got != pytest.approx(full, abs=1e-2)  # the drop shows in the numbers


@pytest.mark.slow
def test_a_flop_budget_buys_more_tokens_with_kv_dropping(engine):
    """The budget gate sees the cheaper decode steps: the same budget stops a dropping request later."""
    llm, ledger = engine
    one_logit_row = 2 * ledger.spec.hidden * ledger.spec.vocab
    budget = ledger.request(900, 60).total + 7 * one_logit_row  # 900 tokens prefill in 8 chunks
    got = {}
    for keep, seed in ((1.0, 43), (0.1, 47)):  # two prompts of one length: no prefix-cache hit between them
        out = llm.generate(
            [{"prompt_token_ids": _prompt(900, seed)}],
            _greedy(120, flop_budget=budget, kv_policy="streaming_llm", kv_keep=keep),
        )[0]
        assert out.outputs[0].stop_reason == "flop_budget"
        assert out.ec_transfer_params["flopwise"]["total"] <= budget
        got[keep] = len(out.outputs[0].token_ids)
    assert got[1.0] in (59, 60) and got[0.1] > got[1.0] + 5


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_long_chunked_prefill_scores_the_whole_prompt(engine, hf, policy):
    """600 tokens in five 128-token chunks: the worker stashes four, keeping the queries the policy reads."""
    from flopwise.hf import kv as hk

    llm, _ = engine
    ids = _prompt(600, seed={"snapkv": 53, "h2o": 59, "tova": 61}[policy])
    out = llm.generate([{"prompt_token_ids": ids}], _greedy(10, kv_policy=policy, kv_keep=0.25))[0]
    ref = hk.generate(hf, ids, kd.parse_options(policy, 0.25), 10, BS)
    assert ref.layout.dropped_blocks == 14
    assert list(out.outputs[0].token_ids) == ref.tokens


@pytest.mark.slow
def test_budget_gate_bounds_steps_with_the_kept_context(engine):
    """Gate = charge: the gate costs a step on the kept KV context, as the charge does, so under the same
    budget a request with KV dropping generates more tokens than without, and its charge still never
    crosses it."""
    llm, ledger = engine
    # + chunk logit rows
    budget = ledger.request(600, 30).total + 4 * 2 * ledger.spec.hidden * ledger.spec.vocab
    got = {}
    for seed, kv in (
        (1001, {}),
        (1002, {"kv_policy": "knorm", "kv_keep": 0.25}),
    ):  # two fresh prompts, one length
        out = llm.generate(
            [{"prompt_token_ids": _prompt(600, seed=seed)}], _greedy(200, flop_budget=budget, **kv)
        )[0]
        assert not out.num_cached_tokens
        charge = out.ec_transfer_params["flopwise"]
        assert out.outputs[0].stop_reason == "flop_budget" and charge["total"] <= budget, charge
        # The next step was refused only because it could have crossed the budget.
        assert (
            budget - charge["total"]
            < ledger.forward(1, start=600 + len(out.outputs[0].token_ids), logits=1).total
        )
        got[bool(kv)] = len(out.outputs[0].token_ids)
    assert got[True] > got[False] >= 30, got
