"""PRMs and the early-rejection rule in the core: the arithmetic verifier, neural PRMs, configs, ranking."""

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flopwise.ledger import FlopModel
from flopwise.prm import PRMError, load_prm, resolve, split_steps
from flopwise.prm.arithmetic import check_line, evaluate
from flopwise.prm.hf import HeadPRM, StepTagPRM, save_head
from flopwise.reasoning import chain_sum, extract_answer, is_correct
from flopwise.techniques.early_rejection import EarlyRejectionConfig, survivors


@pytest.mark.parametrize(
    "line,expected",
    [
        ("12 + 5 = 17", 1.0),
        ("12 + 5 = 18", 0.0),
        ("So 3 * (4 - 1) = 9.", 1.0),
        ("-4 + 7 = 3", 1.0),
        ("7 x 6 = 42", 1.0),
        ("10 / 4 = 2.5", 1.0),
        ("2 + 2 = 4 = 5", 0.0),
        ("Answer: 14", None),
        ("239 Total = 153", None),
        ("x = 5", None),
    ],
)
def test_check_line(line, expected):
    assert check_line(line) == expected


def test_evaluate_refuses_non_arithmetic():
    # power is not in the grammar (a step writing 2**1000 cannot hang the engine)
    assert evaluate("2 ** 10") is None
    assert evaluate("__import__('os')") is None
    assert evaluate("1 / 0") is None
    assert evaluate("3 + 4") == 7.0


def test_split_steps_keeps_the_unfinished_line_out():
    assert split_steps("1 + 2 = 3\n3 + 4 = 7\n7 +", final=False) == ["1 + 2 = 3", "3 + 4 = 7"]
    assert split_steps("1 + 2 = 3\n\nAnswer: 3", final=True) == ["1 + 2 = 3", "Answer: 3"]
    assert split_steps("1 + 2", final=False) == []


def test_verifier_on_reasoning_gym_chain_sum():
    prm = load_prm("verifier:arithmetic")
    problems = chain_sum(20, seed=3)
    for p in problems:
        solution = p.solution()
        assert is_correct(p, solution) and extract_answer(solution) == p.answer
        assert prm.score("", solution, final=True) == (1.0, 0)
        lines = solution.split("\n")
        wrong = lines[0].rsplit("=", 1)[0] + f"= {int(lines[0].rsplit('=', 1)[1]) + 1}"
        broken = "\n".join([wrong, *lines[1:]])
        assert prm.score("", broken, final=True)[0] == 0.0
        # the wrong step is caught as soon as its line is complete, before the answer exists
        assert prm.score("", wrong + "\n", final=False)[0] == 0.0
        assert prm.score("", wrong, final=False)[0] == 0.5  # unfinished line: not judged yet


def test_config_bounds_name_the_field():
    cfg = EarlyRejectionConfig()
    assert (cfg.every_tokens, cfg.fraction, cfg.min_keep, cfg.mode) == (64, 0.5, 1, "reject")
    for bad, field in [
        ({"keep": 0}, "keep"),
        ({"keep": 1.5}, "keep"),
        ({"every_tokens": 0}, "every_tokens"),
        ({"min_keep": 0}, "min_keep"),
        ({"mode": "x"}, "mode"),
        ({"prm_name": "x"}, "prm_name"),
    ]:
        with pytest.raises(ValidationError) as e:
            EarlyRejectionConfig.model_validate(bad)
        assert e.value.errors()[0]["loc"] == (field,)


def test_keep_count_and_survivors():
    cfg = EarlyRejectionConfig(keep=0.5, min_keep=1)
    assert [cfg.keep_count(n) for n in (8, 5, 4, 2, 1)] == [4, 3, 2, 1, 1]
    assert [cfg.rejects_at(n) for n in (8, 2, 1)] == [True, True, False]
    assert EarlyRejectionConfig(keep=0.5, min_keep=3).keep_count(4) == 3
    assert not EarlyRejectionConfig(keep=1.0).rejects_at(16)  # keep=1 is plain best-of-n
    assert survivors([0.2, 0.9, 0.5, 0.9], 2) == [1, 3]
    assert survivors([0.5, 0.5, 0.5, 0.5], 2) == [0, 1]  # ties go to the lower index


def test_keep_rules():
    scores = [0.9, 0.2, 0.6, 0.95, 0.0, 0.6]
    # threshold: only the scores below go, whatever their number
    assert EarlyRejectionConfig(threshold=0.5).kept(scores) == [0, 2, 3, 5]
    assert EarlyRejectionConfig(threshold=0.5).fraction is None  # no hidden keep=0.5 beside a score rule
    # margin below the best live score (0.95)
    assert EarlyRejectionConfig(margin=0.1).kept(scores) == [0, 3]
    # rules combine: a candidate must pass each
    assert EarlyRejectionConfig(threshold=0.5, keep=0.5).kept(scores) == [0, 2, 3]
    # min_keep brings back the best of the rejected
    assert EarlyRejectionConfig(threshold=0.99, min_keep=2).kept(scores) == [0, 3]
    assert EarlyRejectionConfig(threshold=0.5, min_keep=2).rejects_at(3)
    assert not EarlyRejectionConfig(threshold=0.5, min_keep=2).rejects_at(2)
    # percentile: the warm-up cut is numpy's linear-interpolation percentile, and holds as given
    cfg = EarlyRejectionConfig(percentile=60)
    cut = cfg.warmup_cut(scores)
    assert cut == pytest.approx(float(np.percentile(scores, 60)))
    assert cfg.kept(scores, cut) == [i for i, s in enumerate(scores) if s >= cut]
    assert cfg.kept([0.1, 0.2], cut) == [1]  # later checkpoints keep the first one's cut (and min_keep 1)
    assert EarlyRejectionConfig().kept(scores) == [
        0,
        2,
        3,
    ]  # no rule: the paper's keep 0.5, ties to the lower


def test_confidence_scores():
    from flopwise.prm import confidence

    k = 4
    flat = [math.log(1 / k)] * k  # all the mass spread over the top k: the least confident
    peaked = [math.log(0.97), math.log(0.01), math.log(0.01), math.log(0.01)]
    assert confidence.token_confidence(flat) == pytest.approx(0.0, abs=1e-12)
    assert 0.5 < confidence.token_confidence(peaked) < 1.0
    # from logits, as the engine's raw log-softmax gives them
    logits = torch.tensor([5.0, 1.0, 0.0, -1.0, -3.0])
    top = torch.log_softmax(logits, -1).topk(3).values.tolist()
    assert confidence.from_logits(logits, 3) == pytest.approx(confidence.token_confidence(top))
    confs = [0.9, 0.8, 0.2, 0.3, 0.9, 0.9]
    assert confidence.score(confs, 2, "lowest") == pytest.approx(0.25)  # the window (0.2, 0.3)
    assert confidence.score(confs, 2, "tail") == pytest.approx(0.9)
    assert confidence.score(confs, 10, "lowest") == pytest.approx(sum(confs) / 6)  # short: all tokens
    assert confidence.score([], 2, "lowest") == 0.5
    assert resolve("confidence") == "confidence" and resolve("confidence:tail") == "confidence:tail"
    with pytest.raises(PRMError, match="unknown confidence scorer"):
        resolve("confidence:mean")


def test_auroc_is_the_pairwise_win_rate():
    import itertools
    import random

    from flopwise.prm.train import auroc

    def run(scores, labels):
        return auroc(torch.tensor(scores), torch.tensor(labels, dtype=torch.long))

    rng = random.Random(3)
    scores = [round(rng.random(), 1) for _ in range(60)]  # rounded: many ties
    labels = [rng.random() < 0.4 + 0.4 * s for s in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    assert run(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert run([0.1, 0.9], [False, True]) == 1.0 and run([0.5, 0.5], [False, True]) == 0.5
    assert math.isnan(run([0.3, 0.4], [True, True]))  # one class only: undefined


def test_unknown_prm_names_the_field(tmp_path):
    for name in ["verifier:nope", "no/such/dir", ""]:
        with pytest.raises(PRMError, match="early_rejection.prm"):
            resolve(name)
    with pytest.raises(PRMError, match="flopwise_prm.json"):
        resolve(str(tmp_path))


@pytest.fixture(scope="module")
def head_prm(tiny_model, tmp_path_factory):
    base = tiny_model("llama-gqa")
    d = FlopModel.from_pretrained(base).spec.hidden
    g = torch.Generator().manual_seed(0)
    path = save_head(
        tmp_path_factory.mktemp("prm") / "head",
        base,
        torch.randn(d, generator=g),
        torch.zeros(1),
        dtype="float32",
    )
    return str(path), base


def test_head_prm_scores_each_step_and_charges_its_forward(head_prm):
    path, base = head_prm
    prm = load_prm(path)
    assert isinstance(prm, HeadPRM)
    prompt, steps = "Compute 1 + 2 + 3.", ["1 + 2 = 3", "3 + 3 = 6"]
    scores = prm.score_steps(prompt, steps)
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores) and scores[0] != scores[1]
    # the score of a step depends only on what comes before it (causal LM): extending the answer keeps it
    assert prm.score_steps(prompt, steps[:1])[0] == pytest.approx(scores[0], abs=1e-5)
    n = len(prm.tokenizer(prompt + "1 + 2 = 3\n3 + 3 = 6\n", add_special_tokens=False)["input_ids"])
    d = prm.weight.numel()
    assert (
        prm.flops(prompt, steps)
        == FlopModel.from_pretrained(base).forward(n, start=0, logits=0).total + 2 * d * 2
    )


def test_head_prm_keeps_each_candidates_kv_between_checkpoints(head_prm):
    """Keyed by candidate, a call reads only the steps added since the last one: the same scores as reading
    everything, charged the new tokens over the cached context; released or evicted, it reads it all again."""
    path, base = head_prm
    prm = load_prm(path)
    ledger = FlopModel.from_pretrained(base)
    prompt, answer = "Compute 1 + 2 + 3.", "1 + 2 = 3\n3 + 3 = 6\nAnswer: 6"
    d = prm.weight.numel()
    n1 = len(prm._encode(prompt, ["1 + 2 = 3"], "\n")[0])
    n3 = len(prm._encode(prompt, ["1 + 2 = 3", "3 + 3 = 6", "Answer: 6"], "\n")[0])
    first = prm.score(prompt, "1 + 2 = 3\n3", key="a")
    assert first[1] == ledger.forward(n1, start=0, logits=0).total + 2 * d
    assert prm.cost(prompt, "1 + 2 = 3\n3", key="a") == 0  # nothing new since
    full = prm.score(prompt, answer, final=True)  # no key: reads everything
    again = prm.score(prompt, answer, final=True, key="a")
    assert again[0] == pytest.approx(full[0], abs=1e-5)
    assert again[1] == ledger.forward(n3 - n1, start=n1, logits=0).total + 2 * d * 2 < full[1]
    prm.release("a")
    assert prm.cost(prompt, answer, final=True, key="a") == full[1]
    prm.max_sessions = 1
    try:
        prm.score(prompt, "1 + 2 = 3\n", key="a")
        prm.score(prompt, "1 + 2 = 3\n", key="b")  # evicts a
        assert prm.cost(prompt, answer, final=True, key="a") == full[1]
    finally:
        prm.max_sessions = 256
        prm.release("b")


def test_step_tag_prm_reads_good_label_probability(tiny_model, tmp_path):
    import json
    import shutil

    base = tiny_model("llama-gqa")
    ckpt = tmp_path / "steptag"
    shutil.copytree(base, ckpt)
    (ckpt / "flopwise_prm.json").write_text(
        json.dumps({"type": "step-tag", "step_tag": "#", "good": "+", "bad": "-"})
    )
    prm = load_prm(str(ckpt))
    assert isinstance(prm, StepTagPRM)
    scores = prm.score_steps("q", ["a b", "c d", "e"])
    ids, ends = prm._encode("q", ["a b", "c d", "e"], " #\n")
    logits = prm.model(input_ids=torch.tensor([ids])).logits[0]
    # keyed: the steps added later are read over the cached ones, same scores
    assert prm.score_steps("q", ["a b"], key="c") == pytest.approx(scores[:1], abs=1e-5)
    assert prm.score_steps("q", ["a b", "c d", "e"], key="c") == pytest.approx(scores, abs=1e-5)
    prm.release("c")
    good, bad = prm.good_bad
    for s, e in zip(scores, ends):
        expected = torch.softmax(logits[e - 1, [good, bad]].float(), -1)[0].item()
        assert s == pytest.approx(expected, abs=1e-6)
    (ckpt / "flopwise_prm.json").write_text(
        json.dumps({"type": "step-tag", "step_tag": "#", "good": "no-such-token"})
    )
    load_prm.cache_clear()
    with pytest.raises(PRMError, match="not in the tokenizer"):
        load_prm(str(ckpt))


def test_self_head_steps_labels_and_scores():
    from flopwise.prm import self_head

    nl = frozenset({9})
    # a step value where each newline was emitted, and at the last token of a final answer not ending on one
    assert self_head.step_rows([1, 9, 2, 2, 9, 3], nl, final=False) == [1, 4]
    assert self_head.step_rows([1, 9, 2, 2, 9, 3], nl, final=True) == [1, 4, 5]
    assert self_head.step_rows([1, 9], nl, final=True) == [1]
    assert self_head.prefix_label("Let's see\n", final=False) is None
    assert self_head.prefix_label("1 + 2 = 3\n4 + 4 = ", final=False) == 1  # the open line is not a step
    assert self_head.prefix_label("1 + 2 = 3\n3 + 4 = 8\n8 + 1 = 9\n", final=False) == 0  # wrong from one on
    assert self_head.score([]) == 0.5
    assert self_head.score([2.0, -1.0, 3.0]) == pytest.approx(1 / (1 + math.exp(1.0)))  # the lowest step
    # the engine's and the oracle's running record of one candidate: values as its tokens come
    sv = self_head.StepValues()
    for value, token in zip([0.5, 2.0, -3.0, 1.0], [1, 9, 2, 9]):
        sv.add(value, ends_step=token in nl)
    assert sv.values(final=False) == sv.values(final=True) == [2.0, 1.0]  # it ends on a newline
    sv.add(-4.0, ends_step=False)
    assert sv.values(final=False) == [2.0, 1.0] and sv.values(final=True) == [2.0, 1.0, -4.0]
    assert sv.score(final=True) == pytest.approx(1 / (1 + math.exp(4.0)))


def test_self_head_refuses_other_models_and_bad_dirs(tmp_path):
    from flopwise.prm import self_head

    out = self_head.save(
        tmp_path / "h", "LlamaForCausalLM", 4, torch.tensor([1.0, 0, 0, 0]), torch.tensor(0.5)
    )
    name = f"self:{out}"
    assert resolve(name) == name
    head = self_head.load(name)
    assert head.values(torch.tensor([[2.0, 9, 9, 9]])) == [2.5] and head.flops_per_token == 8
    self_head.check_fits(name, "LlamaForCausalLM", 4)
    with pytest.raises(PRMError, match="a LlamaForCausalLM with hidden size 4; the served model is a Qwen2"):
        self_head.check_fits(name, "Qwen2ForCausalLM", 4)
    with pytest.raises(PRMError, match="hidden size 8"):
        self_head.check_fits(name, "LlamaForCausalLM", 8)
    with pytest.raises(PRMError, match="early_rejection.prm='self:nope': not a self head"):
        resolve("self:nope")
    with pytest.raises(PRMError, match="computed by the engine"):
        load_prm(name)
    (tmp_path / "h" / "flopwise_prm.json").write_text('{"type": "head"}')
    with pytest.raises(PRMError, match="not a self head's config"):
        self_head.read_config(name)


def test_self_examples_read_the_emitting_positions(tiny_model):
    """Training features for a self head: the last hidden state at the position that emitted each step's
    token, the same in a padded batch as read alone."""
    from transformers import AutoModelForCausalLM

    from flopwise.prm.train import self_examples

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama-gqa"), dtype=torch.float32).eval()
    traces = [([1, 2, 3], [4, 9, 5, 6]), ([1, 2], [9, 7, 9])]
    texts = {(4, 9): "1 + 1 = 2\n", (9,): "\n", (9, 7, 9): "\n1 + 1 = 3\n"}
    out = self_examples(model, traces, frozenset({9}), lambda ids: texts.get(tuple(ids), "x"), batch=2)
    alone = model(input_ids=torch.tensor([[1, 2, 3, 4, 9, 5, 6]]), output_hidden_states=True).hidden_states[
        -1
    ][0]
    x, labels = out[0]
    assert torch.allclose(x, alone[[3 + 1 - 1, 3 + 3 - 1]], atol=1e-5)  # emitted the newline; the last token
    assert labels == [1, None]
    assert out[1][1] == [None, 0]


def test_train_prm_self_fits_a_head_that_loads_on_its_generator_only(tiny_model, tmp_path):
    """``flopwise train-prm --self`` past its sampling step: verifier labels on the generator's own hidden
    states, a fitted head that loads on that model and is refused on another."""
    from transformers import AutoTokenizer

    from flopwise.prm import self_head
    from flopwise.prm.train import fit_head
    from flopwise_serve.train_prm import self_features

    gen = tiny_model("llama-gqa")
    tok = AutoTokenizer.from_pretrained(gen)
    answers = ["1 + 2 = 3\n3 + 3 = 6\nAnswer: 6", "1 + 2 = 3\n3 + 3 = 7\nAnswer: 7", "1 + 2 = 4\nAnswer: 4"]
    traces = [
        {"problem": i, "prompt_ids": tok.encode("Compute 1 + 2 + 3."), "output_ids": tok.encode(a)}
        for i, a in enumerate(answers)
    ]
    feats, labels, groups, config = self_features(gen, traces)
    # a value where each line ends and at the last token; right so far: the second answer errs on line 2
    assert labels == [1, 1, 1, 1, 0, 0, 0, 0] and groups == [0, 0, 0, 1, 1, 1, 2, 2]
    assert torch.cat(feats).shape == (8, config.hidden_size)
    weight, bias = fit_head(torch.cat(feats), torch.tensor(labels))
    out = self_head.save(tmp_path / "self", config.architectures[0], config.hidden_size, weight, bias)
    spec = FlopModel.from_pretrained(gen).spec
    self_head.check_fits(f"self:{out}", spec.architecture, spec.hidden)
    other = FlopModel.from_pretrained(tiny_model("qwen2-gqa")).spec
    with pytest.raises(PRMError, match="the served model is a Qwen2ForCausalLM"):
        self_head.check_fits(f"self:{out}", other.architecture, other.hidden)
