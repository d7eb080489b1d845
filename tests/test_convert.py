"""Checkpoint transforms: exact where the math says so, loadable by transformers and vLLM, charged their
reduced cost."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

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
def test_converted_checkpoints_are_served_and_charged_their_reduced_cost(converted, tmp_path, server, which):

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
