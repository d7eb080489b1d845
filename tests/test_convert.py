"""Checkpoint transforms: exact where the math says so, loadable by transformers and vLLM, charged their
reduced cost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from flopwise.convert import sqa
from flopwise.convert.checkpoint import DistillCheckpoint
from flopwise.convert.moe import MoEMergeConfig, calibrate
from flopwise.convert.moe import convert as moe_convert
from flopwise.convert.sqa import SQAConfig, head_importance
from flopwise.convert.sqa import convert as sqa_convert
from flopwise.hf.tiny import FAMILIES
from flopwise.ledger import FlopModel


def _model(family):
    cfg = json.loads(json.dumps(FAMILIES[family]))
    arch = cfg.pop("architectures")[0]
    config = transformers.AutoConfig.for_model(**cfg)
    config.architectures = [arch]
    torch.manual_seed(0)
    kwargs = {"experts_implementation": "eager"} if "moe" in family or family == "mixtral" else {}
    model = getattr(transformers, arch)._from_config(config, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


X = torch.randint(10, 2000, (2, 24))
ROWS = torch.randint(10, 2000, (4, 32))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-gqa"])
def test_merging_duplicate_heads_is_exact(family):
    """Two heads with the same query projection attend alike: one head with both o_proj slices is the same
    layer."""
    model = _model(family)
    for layer in model.model.layers:
        att = layer.self_attn
        with torch.no_grad():
            w = att.q_proj.weight.view(4, 32, -1)
            w[1], w[3] = w[0].clone(), w[2].clone()  # heads 0,1 share KV group 0; heads 2,3 group 1
            if att.q_proj.bias is not None:
                b = att.q_proj.bias.view(4, 32)
                b[1], b[3] = b[0].clone(), b[2].clone()
    new = sqa_convert(model, SQAConfig(2, method="merge"), head_importance(model, ROWS))
    assert new.config.num_attention_heads == 2 and new.config.head_dim == 32
    torch.testing.assert_close(_logits(new), _logits(model), atol=1e-4, rtol=1e-4)


def test_selecting_away_silent_heads_is_exact():
    model = _model("llama-gqa")
    for layer in model.model.layers:
        with torch.no_grad():
            layer.self_attn.o_proj.weight.view(-1, 4, 32)[:, [1, 3]] = 0  # heads 1 and 3 contribute nothing
    importance = head_importance(model, ROWS)
    assert (importance[:, [1, 3]] == 0).all() and (importance[:, [0, 2]] > 0).all()
    new = sqa_convert(model, SQAConfig(2, method="select"), importance)
    torch.testing.assert_close(_logits(new), _logits(model), atol=1e-5, rtol=1e-5)


def test_merging_kv_groups_keeps_shapes_and_is_charged_less():
    model = _model("llama-gqa")
    new = sqa_convert(model, SQAConfig(2, kv_heads=1, method="merge"), head_importance(model, ROWS))
    assert (new.config.num_attention_heads, new.config.num_key_value_heads) == (2, 1)
    cfg = {**new.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    full = FlopModel.from_pretrained(FAMILIES["llama-gqa"]).forward(2048).as_dict()
    reduced = FlopModel.from_pretrained(cfg).forward(2048).as_dict()
    assert reduced["attention"] * 2 == full["attention"] and reduced["mlp"] == full["mlp"]


def _readout_error(student, teacher) -> list[float]:
    """Per layer, the relative squared error of the student's attention output against the teacher's, on the
    teacher's own inputs to that layer, over ROWS (what refit_output minimises)."""
    num, den = {}, {}

    def visit(i, x, y):
        w = student.model.layers[i].self_attn.o_proj.weight.double()
        num[i] = num.get(i, 0.0) + float(((x @ w.T - y) ** 2).sum())
        den[i] = den.get(i, 0.0) + float((y**2).sum())

    sqa._attention_pairs(teacher, student, ROWS, 4, visit)
    return [num[i] / den[i] for i in sorted(num)]


@pytest.mark.parametrize("method", ["select", "merge"])
def test_output_refit_is_the_least_squares_readout(method):
    model = _model("llama-gqa")
    new = sqa_convert(model, SQAConfig(2, method=method), head_importance(model, ROWS))
    before = _readout_error(new, model)
    errors = sqa.refit_output(new, model, ROWS, ridge=1e-9)
    after = _readout_error(new, model)
    assert all(a < 0.9 * b for a, b in zip(after, before))
    assert errors == pytest.approx(after, rel=1e-4)  # what it reports is the error it leaves
    # a least-squares optimum: nudging the fitted weights any way makes it worse
    layer = new.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        layer.weight.add_(1e-3 * torch.randn_like(layer.weight))
    assert _readout_error(new, model)[0] > after[0]


def test_output_refit_keeps_an_exact_selection_exact():
    model = _model("llama-gqa")
    for layer in model.model.layers:
        with torch.no_grad():
            layer.self_attn.o_proj.weight.view(-1, 4, 32)[:, [1, 3]] = 0
    new = sqa_convert(model, SQAConfig(2, method="select"), head_importance(model, ROWS))
    errors = sqa.refit_output(new, model, ROWS, ridge=1e-9)
    assert max(errors) < 1e-8
    torch.testing.assert_close(_logits(new), _logits(model), atol=1e-4, rtol=1e-4)


def test_distill_schedule_warms_up_then_decays_by_cosine():
    cfg = sqa.DistillConfig(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then falling
    assert lrs[55] == pytest.approx(0.55e-3, rel=0.02)  # half-way down the cosine
    assert lrs[99] == pytest.approx(1e-4, rel=0.01)


def _distilled(steps, every=0, on_every=None, progress=None, state=None, opt_state=None, align=0.0):
    teacher = _model("llama-gqa")
    student = sqa_convert(teacher, SQAConfig(2, method="select"), head_importance(teacher, ROWS))
    if state is not None:
        student.load_state_dict(state.pop("student"))
    cfg = sqa.DistillConfig(steps, lr=1e-3, warmup=2, batch=2, align=align)
    rows = torch.randint(10, 2000, (6, 32), generator=torch.Generator().manual_seed(1))
    st = sqa.distill(
        student,
        teacher,
        rows,
        cfg,
        state=None if state is None else sqa.DistillState(**state["state"]),
        optimizer_state=opt_state,
        every=every,
        on_every=None if on_every is None else (lambda st, opt: on_every(student, opt, st)),
        progress=progress,
    )
    return student, st


@pytest.mark.parametrize("align", [0.0, 1.0])
def test_an_interrupted_distillation_resumes_to_the_same_weights(tmp_path, align):
    whole, whole_state = _distilled(6, align=align)
    ckpt = DistillCheckpoint(tmp_path / "out", {"k": 1})

    def stop(step, _loss):
        if step == 5:
            raise KeyboardInterrupt  # killed between two checkpoints: steps 3..5 are lost

    with pytest.raises(KeyboardInterrupt):
        _distilled(6, every=2, on_every=ckpt.save, progress=stop, align=align)
    saved = ckpt.load()
    assert saved["state"]["step"] == 4 and len(saved["state"]["losses"]) == 4
    resumed, state = _distilled(6, state=saved, opt_state=saved["optimizer"], align=align)
    assert state.losses == whole_state.losses
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert whole_state.losses[-1] < whole_state.losses[0]  # and it learns


@pytest.mark.parametrize("method", ["frequency", "reap"])
def test_pruning_a_never_routed_expert_is_exact(method):
    """Residual dimension 0 is held at +10 and is all the MoE blocks see, so every token ranks the experts
    0 > 1 > 2 > 3: experts 2 and 3 are never in the top 2, and dropping one of them changes nothing."""
    model = _model("mixtral")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0  # nothing writes to dimension 0 ...
            layer.mlp.experts.down_proj[:, 0, :] = 0
            layer.post_attention_layernorm.weight.zero_()  # ... and it is all the router sees
            layer.post_attention_layernorm.weight[0] = 1.0
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, -5.0])
    stats = calibrate(model, ROWS)
    assert all(s["freq"][2] == 0 and s["freq"][3] == 0 and s["freq"][0] == 1 for s in stats.values())
    new = moe_convert(model, MoEMergeConfig(3, method), stats)
    assert new.config.num_local_experts == 3
    torch.testing.assert_close(_logits(new), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "qwen3-moe"])
@pytest.mark.parametrize("method", ["mc-smoe", "reap", "hc-smoe", "frequency", "uniform"])
def test_every_method_on_every_moe_family(family, method):
    model = _model(family)
    stats = calibrate(model, ROWS)
    new = moe_convert(model, MoEMergeConfig(2, method, top_k=1), stats)
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(new.config, key) == 2 and new.config.num_experts_per_tok == 1
    for layer in new.model.layers:
        if hasattr(layer.mlp, "experts"):
            assert layer.mlp.gate.weight.shape[0] == 2 and layer.mlp.experts.gate_up_proj.shape[0] == 2
    assert torch.isfinite(_logits(new)).all()


def test_top_k_only_cuts_active_flops():
    model = _model("mixtral")
    new = moe_convert(model, MoEMergeConfig(4, "frequency", top_k=1), calibrate(model, ROWS))
    assert new.config.num_local_experts == 4 and new.config.num_experts_per_tok == 1
    before = FlopModel.from_pretrained(FAMILIES["mixtral"]).forward(1, start=100).as_dict()
    after = (
        FlopModel.from_pretrained({**new.config.to_dict(), "architectures": ["MixtralForCausalLM"]})
        .forward(1, start=100)
        .as_dict()
    )
    assert after["experts"] * 2 == before["experts"]


# -- the CLI end to end ------------------------------------------------------------------------------
def flopwise(*args):
    return subprocess.run(
        [sys.executable, "-m", "flopwise_serve.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sqa", "LLAMA", "OUT", "--query-heads", "3"], "--query-heads 3"),
        (["sqa", "LLAMA", "OUT", "--query-heads", "4"], "nothing to reduce"),
        (["sqa", "LLAMA", "OUT", "--query-heads", "2", "--kv-heads", "3"], "--kv-heads 3"),
        (["sqa", "LLAMA", "OUT", "--query-heads", "2", "--resume"], "needs --distill-steps"),
        (
            ["sqa", "LLAMA", "OUT", "--query-heads", "2", "--distill-steps", "4", "--resume"],
            "no distillation",
        ),
        (["sqa", "LLAMA", "OUT", "--query-heads", "2", "--lr", "0"], "--lr"),
        (["sqa", "MIXTRAL", "OUT", "--query-heads", "2"], "MixtralForCausalLM"),
        (["moe-merge", "LLAMA", "OUT", "--experts", "2"], "not a MoE model"),
        (["moe-merge", "MIXTRAL", "OUT", "--experts", "4"], "--experts 4"),
        (["moe-merge", "MIXTRAL", "OUT", "--experts", "1"], "fewer than top-k 2"),
        (["moe-merge", "MIXTRAL", "OUT", "--experts", "3", "--top-k", "3"], "--top-k 3"),
        (["moe-merge", "/no/such/dir", "OUT", "--experts", "1"], "/no/such/dir"),
        (["sqa", "LLAMA", "EXISTING", "--query-heads", "2"], "--force"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_nothing_written(tiny_model, tmp_path, args, needle):
    (tmp_path / "existing").mkdir()
    subst = {
        "LLAMA": tiny_model("llama-gqa"),
        "MIXTRAL": tiny_model("mixtral"),
        "OUT": str(tmp_path / "out"),
        "EXISTING": str(tmp_path / "existing"),
    }
    r = flopwise("convert", *[subst.get(a, a) for a in args])
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "error" in last and needle in last
    assert not (tmp_path / "out").exists() and list((tmp_path / "existing").iterdir()) == []


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """An SQA (4 -> 2 query heads, merged, distilled 2 steps) and a MoE (4 -> 2 experts, top-1) checkpoint."""
    root = tmp_path_factory.mktemp("converted")
    sqa_out, moe_out = root / "sqa", root / "moe"
    r = flopwise(
        "convert",
        "sqa",
        tiny_model("llama-gqa"),
        str(sqa_out),
        "--query-heads",
        "2",
        "--method",
        "merge",
        "--distill-steps",
        "2",
        "--calib-blocks",
        "4",
        "--eval-blocks",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = flopwise(
        "convert",
        "moe-merge",
        tiny_model("mixtral"),
        str(moe_out),
        "--experts",
        "2",
        "--top-k",
        "1",
        "--method",
        "mc-smoe",
        "--calib-blocks",
        "4",
        "--eval-blocks",
        "4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {"sqa": str(sqa_out), "moe": str(moe_out)}


@pytest.mark.slow
def test_reports_and_transformers_loading(converted):
    for out in converted.values():
        report = json.loads((Path(out) / "flopwise_report.json").read_text())
        assert (
            report["after"]["decode_flops_per_token_at_512"]
            < report["before"]["decode_flops_per_token_at_512"]
        )
        assert report["perplexity_before"] > 0 and report["perplexity_after"] > 0
        transformers.AutoModelForCausalLM.from_pretrained(out)  # stock transformers loads it as it is


@pytest.mark.slow
@pytest.mark.parametrize(
    "which,server",
    [
        ("sqa", "vllm serve"),
        ("moe", "flopwise serve"),
        # each transform and each server is in make test once; the other two pairs in make test-long
        pytest.param("sqa", "flopwise serve", marks=pytest.mark.long),
        pytest.param("moe", "vllm serve", marks=pytest.mark.long),
    ],
)
def test_converted_checkpoints_are_served_and_charged_their_reduced_cost(
    converted, tiny_model, tmp_path, server, which
):

    import httpx

    from flopwise_serve.launch import flopwise_server, free_port, vllm_serve

    path, port = converted[which], free_port()
    if server == "vllm serve":
        srv = vllm_serve(path, port, tmp_path / "server.log", ["--max-model-len", "512"])
    else:
        srv = flopwise_server(
            path, port, tmp_path / "server.log", ["--max-model-len", "512", "--dtype", "float32"]
        )
    with srv:
        r = httpx.post(
            f"{srv.url}/v1/completions",
            timeout=60,
            json={
                "model": path,
                "prompt": "def f(x):",
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
        ).json()
    u = r["usage"]
    expected = FlopModel.from_pretrained(path).request(u["prompt_tokens"], u["completion_tokens"]).total
    # Plain vllm serve returns the engine's charge in ec_transfer_params; flopwise serve in usage.flops.
    charged = (
        u["flops"]["total"] if server == "flopwise serve" else r["ec_transfer_params"]["flopwise"]["total"]
    )
    assert u["completion_tokens"] == 8 and charged == expected
    # the same tokens on the original model are charged more
    source = tiny_model("llama-gqa" if which == "sqa" else "mixtral")
    original = FlopModel.from_pretrained(source).request(u["prompt_tokens"], u["completion_tokens"])
    assert original.total > charged


def test_a_killed_distillation_resumes_and_refuses_other_arguments(tiny_model, tmp_path):
    """A run killed mid-distillation leaves OUT.distill/; a rerun must say --resume, a resume with other
    arguments is refused naming them (the checkpoint untouched), and the same arguments finish the run from
    where it stood."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    args = ["convert", "sqa", tiny_model("llama-gqa"), str(out), "--query-heads", "2", "--calib-blocks", "2"]
    args += ["--eval-blocks", "2", "--distill-steps", "60", "--eval-every", "2"]
    ckpt = Path(f"{out}.distill") / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "flopwise_serve.cli", *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt.exists() and not out.exists()
    step = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 2 <= step < 60

    r = flopwise(*args)
    assert r.returncode == 2 and "--resume" in r.stderr and f"step {step}" in r.stderr
    stamp = ckpt.stat().st_mtime_ns
    r = flopwise(*args, "--resume", "--lr", "1e-3")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "--lr: 0.0002 → 0.001" in last, last
    assert ckpt.stat().st_mtime_ns == stamp and not out.exists()

    r = flopwise(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "flopwise_report.json").read_text())
    curve = [p["step"] for p in report["distill"]["curve"]]
    assert curve[0] == 0 and curve[-1] == 60 and curve == sorted(set(curve))  # one curve across both runs
    assert report["distill"]["resumed_at"] == [step]
    assert not ckpt.parent.exists()  # the training state goes once OUT is complete
