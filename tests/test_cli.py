"""`flopwise flops` and the CLI's error contract: one line naming the problem, exit code 2."""

import json
import subprocess
import sys

import pytest

from flopwise.hf.tiny import FAMILIES
from flopwise.ledger import FlopModel
from flopwise.options import Defaults


def flopwise(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "flopwise_serve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def config_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FAMILIES["qwen2-moe"]))
    return tmp_path


def test_flops_json_from_a_dir_holding_only_config(config_only):
    r = flopwise("flops", str(config_only), "--prompt-tokens", "100", "--output-tokens", "20", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = FlopModel.from_pretrained(FAMILIES["qwen2-moe"]).request(100, 20)
    assert (out["prefill"], out["decode"], out["total"]) == (
        expected.prefill.total,
        expected.decode.total,
        expected.total,
    )
    assert out["components"] == (expected.prefill + expected.decode).as_dict()
    assert {"experts", "router", "shared_experts", "attention"} <= set(out["components"])


def test_flops_table(config_only):
    r = flopwise("flops", str(config_only / "config.json"), "--prompt-tokens", "8", "--output-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "experts" in r.stdout and "MFLOP" in r.stdout


def test_flops_images_for_a_vlm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FAMILIES["llava"]))
    r = flopwise(
        "flops", str(tmp_path), "--prompt-tokens", "8", "--output-tokens", "2", "--images", "2", "--json"
    )
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == 8 + 2 * 16 and out["components"]["vision"] > 0


def test_flops_default_model_is_smollm2():
    r = flopwise("flops", "--prompt-tokens", "10", "--output-tokens", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["architecture"] == "LlamaForCausalLM"
    # 30 layers x (qkv 576x(9+6)x64 + o 576x576 + mlp 3x576x1536) x 2 FLOPs x 10 tokens, + causal attention +
    # 1 logit row
    linear = 2 * 10 * 30 * (576 * 15 * 64 + 576 * 576 + 3 * 576 * 1536)
    attention = 30 * 4 * 9 * 64 * (10 * 11 // 2)
    assert out["total"] == linear + attention + 2 * 576 * 49152


@pytest.mark.parametrize(
    "args,needle",
    [
        (["/no/such/model"], "/no/such/model"),
        (["CFG", "--prompt-tokens", "0"], "--prompt-tokens"),
        (["CFG", "--prompt-tokens", "abc"], "--prompt-tokens"),
        (["CFG", "--output-tokens", "-3"], "--output-tokens"),
        (["CFG", "--output-tokens", "2.5"], "--output-tokens"),
        (["BAD_ARCH"], "GPT2LMHeadModel"),
        (["NO_FIELD"], "num_attention_heads"),
        (["CFG", "--images", "1"], "vision tower"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, config_only, args, needle):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "nofield").mkdir()
    cfg = {k: v for k, v in FAMILIES["llama-gqa"].items() if k != "num_attention_heads"}
    (tmp_path / "nofield" / "config.json").write_text(json.dumps(cfg))
    subst = {
        "CFG": str(config_only),
        "BAD_ARCH": str(tmp_path / "bad"),
        "NO_FIELD": str(tmp_path / "nofield"),
    }
    argv = [subst.get(a, a) for a in args]
    defaults = [a for a in ("--prompt-tokens", "--output-tokens") if a not in argv]
    for flag in defaults:
        argv += [flag, "4"]
    r = flopwise("flops", *argv)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "error" in last and needle in last


def test_serve_refuses_an_unknown_model_before_starting():
    r = flopwise("serve", "/no/such/model", timeout=60)
    assert r.returncode == 2 and "/no/such/model" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--early-rejection", '{"keep": 2}'], "--early-rejection: keep"),
        (["--early-rejection", '{"every_tokens": 0}'], "--early-rejection: every_tokens"),
        (["--early-rejection", "[1]"], "--early-rejection"),
        (["--early-rejection", "{nope"], "--early-rejection"),
        (["--prm", "verifier:nope"], "--prm"),
    ],
)
def test_serve_checks_early_rejection_defaults_before_starting(tiny_model, args, needle):
    r = flopwise("serve", tiny_model("llama-gqa"), *args, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def _defaults(*argv):
    """The Defaults `flopwise serve ARGV` hands its engine, as the engine reads them back."""
    from flopwise.options import defaults_from_json
    from flopwise_serve.cli import build_parser
    from flopwise_serve.serve import serve_command, server_defaults

    args, _ = build_parser().parse_known_args(["serve", *argv])
    argv_out, env = serve_command("/m", [], defaults=server_defaults(args))
    return argv_out, env, defaults_from_json(env["FLOPWISE_DEFAULTS"])


def test_serve_passes_early_rejection_defaults_to_the_server():
    _, _, d = _defaults("--early-rejection", '{"every_tokens": 16}', "--prm", "verifier:arithmetic")
    assert d.early_rejection == {"every_tokens": 16} and d.prm == "verifier:arithmetic"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--visual-keep", "0"], "--visual-keep: visual_keep must be in (0, 1]"),
        (["--visual-keep", "x"], "--visual-keep: visual_keep must be a number"),
        (["--visual-drop", "nope"], "--visual-drop: invalid choice"),
        (["--visual-drop-layer", "-1"], "--visual-drop-layer: must be a non-negative integer"),
    ],
)
def test_serve_checks_visual_defaults_before_starting(args, needle):
    r = flopwise("serve", "/no/such/model", *args, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_serve_trusts_only_flopwise_mm_kwargs_unless_told():
    from flopwise_serve.serve import serve_command

    argv, env, d = _defaults("--visual-keep", "0.25", "--visual-drop", "uniform", "--visual-drop-layer", "2")
    assert "--trust-request-mm-kwargs" in argv and d.mm_kwargs_gate
    assert (d.visual_keep, d.visual_drop, d.visual_drop_layer) == (0.25, "uniform", 2)
    argv, env = serve_command("/m", ["--trust-request-mm-kwargs"])
    assert argv.count("--trust-request-mm-kwargs") == 1 and env["FLOPWISE_DEFAULTS"] == "{}"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--kv-keep", "0"], "--kv-keep: kv_keep must be in (0, 1]"),
        (["--kv-keep", "x"], "--kv-keep: invalid float value"),
        (["--kv-policy", "lru"], "--kv-policy: unknown kv_policy 'lru'"),
        (
            ["--kv-policy", "snapkv", "--kv-keep-tokens", "16"],
            "--kv-keep-tokens: kv_keep_tokens=16 is below the 64",
        ),
        (["--kv-keep", "0.5", "--kv-keep-tokens", "100"], "--kv-keep-tokens: give kv_keep or kv_keep_tokens"),
    ],
)
def test_serve_checks_kv_defaults_before_starting(tiny_model, args, needle):
    r = flopwise("serve", tiny_model("llama-gqa"), *args, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_serve_passes_kv_defaults_to_the_engine(monkeypatch):
    monkeypatch.setenv("FLOPWISE_DEFAULTS", '{"kv_keep_tokens": 999}')  # a stale value in the caller's env
    _, env, d = _defaults("--kv-keep", "0.25")
    assert (d.kv_policy, d.kv_keep, d.kv_keep_tokens) == (None, 0.25, None)
    _, _, d = _defaults("--kv-policy", "streaming_llm", "--kv-keep-tokens", "256")
    assert (d.kv_policy, d.kv_keep, d.kv_keep_tokens) == ("streaming_llm", None, 256)
    _, env, d = _defaults()
    assert d == Defaults(mm_kwargs_gate=True) and "kv" not in env["FLOPWISE_DEFAULTS"]


@pytest.mark.parametrize(
    "args,positional,rest",
    [
        (["--max-model-len", "2048"], [], ["--max-model-len", "2048"]),  # was read as the model "2048"
        (["--max-model-len=2048"], [], ["--max-model-len=2048"]),
        (["M", "--max-model-len", "2048"], ["M"], ["--max-model-len", "2048"]),
        (["--max-model-len", "2048", "M"], ["M"], ["--max-model-len", "2048"]),
        (
            ["--dtype", "float32", "M", "--enforce-eager", "--max-num-seqs", "4"],
            ["M"],
            ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4"],
        ),
        (["--no-enable-prefix-caching", "M"], ["M"], ["--no-enable-prefix-caching"]),
        (["--block-size=32", "--seed", "-1", "M"], ["M"], ["--block-size=32", "--seed", "-1"]),
        (["--hf-overrides", '{"a": 1}', "M"], ["M"], ["--hf-overrides", '{"a": 1}']),
        (
            ["--data-parallel-size", "2", "--scheduling-policy", "priority"],
            [],
            ["--data-parallel-size", "2", "--scheduling-policy", "priority"],
        ),
    ],
)
@pytest.mark.parametrize("kind", ["serve", "engine"])
def test_vllm_options_are_told_from_the_model_by_vllms_own_table(args, positional, rest, kind):
    from flopwise_serve.vllm_args import split_positional

    assert split_positional(args, kind) == (positional, rest)


def test_unknown_or_incomplete_vllm_options_are_one_line_errors(tmp_path):
    r = flopwise("serve", "--max-model-len", timeout=120)
    assert r.returncode == 2 and "--max-model-len: expected a value" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "in.jsonl").write_text("{}\n")
    r = flopwise("batch", "--max-model-len", "512", "-o", str(tmp_path / "o.jsonl"), timeout=120)
    assert r.returncode == 2 and "give one INPUT file" in r.stderr, r.stderr[-500:]


def test_an_option_no_one_knows_is_named():
    from flopwise_serve.vllm_args import VllmArgsError, split_positional

    with pytest.raises(VllmArgsError, match="'--no-such-option'"):
        split_positional(["--no-such-option", "3"], "serve")
