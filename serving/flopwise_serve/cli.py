"""The ``flopwise`` command: serve, flops, demo, bench, model.

Bad input gets one line naming the problem and exit code 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flopwise import hw
from flopwise.ledger import FlopModel, LedgerError

PROG = "flopwise"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def human(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:.0f} FLOP"


# -- flopwise flops ------------------------------------------------------------------------------------
def cmd_flops(args) -> int:
    from flopwise.models import ModelNotFound, resolve_model

    try:
        path = args.model if args.model and os.path.exists(args.model) else resolve_model(args.model)
        model = FlopModel.from_pretrained(path, image_size=args.image_size)
        cost = model.request(args.prompt_tokens, args.output_tokens, cached_tokens=args.cached_tokens, images=args.images)
    except (LedgerError, ModelNotFound) as e:
        return fail("flops", str(e))
    report = {"model": path, "architecture": model.spec.architecture, **cost.as_dict()}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{model.spec.architecture} at {path}")
    print(f"prompt {cost.prompt_tokens} tokens ({cost.cached_tokens} cached, {cost.images} images), output {cost.output_tokens} tokens")
    rows = [("prefill", cost.prefill.total), ("decode", cost.decode.total), ("total", cost.total)]
    rows += [(f"  {k}", v) for k, v in report["components"].items()]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>22,d}  {human(value):>14}")
    return 0


# -- flopwise serve ------------------------------------------------------------------------------------
VLLM_ENTRY = "vllm.entrypoints.launchers.api_server.entry"


def _has_flag(argv: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def flop_amount(text: str) -> float:
    """A positive, finite number of FLOPs (``1e12`` style accepted)."""
    from flopwise.budget import BudgetError, parse_budget

    try:
        return parse_budget(float(text), field="value")
    except (ValueError, BudgetError):
        raise argparse.ArgumentTypeError(f"must be a positive number of FLOPs, got {text!r}") from None


def keep_ratio(text: str) -> float:
    from flopwise.techniques.visual_drop import VisualDropError, parse_options

    try:
        return parse_options(float(text)).keep
    except VisualDropError as e:  # a ValueError too: catch it first
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"visual_keep must be a number in (0, 1], got {text!r}") from None


def visual_method(text: str) -> str:
    """A ``visual_drop`` method name; checked only when given, so building the parser imports no torch."""
    from flopwise.techniques.visual_drop import method_names

    if text not in method_names():
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(method_names())})")
    return text


def serve_command(model: str, vllm_args: list[str], host: str = "127.0.0.1", port: int = 8000,
                  default_budget: float | None = None, max_budget: float | None = None,
                  policy: str = "fifo", early_rejection: str | None = None,
                  prm: str | None = None, visual_keep: float | None = None,
                  visual_drop: str | None = None, visual_drop_layer: int | None = None,
                  kv: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment ``flopwise serve`` runs. ``kv``: the KV-dropping
    defaults as env entries (:func:`kv_defaults`)."""
    from flopwise.budget import Policy
    from flopwise_vllm import PLUGIN_NAMES, SCHEDULER_CLS
    from flopwise_vllm.platform import MAX_BUDGET_ENV
    from flopwise_vllm.scheduler import POLICY_ENV
    from flopwise.techniques.visual_drop import DEFAULT_KEEP_ENV, DEFAULT_LAYER_ENV, DEFAULT_METHOD_ENV
    from flopwise_vllm.serving import DEFAULT_BUDGET_ENV, DEFAULT_PRM_ENV, DEFAULT_REJECTION_ENV, MM_KWARGS_GATE_ENV

    argv = [sys.executable, "-m", VLLM_ENTRY, "--model", model, "--host", host, "--port", str(port)]
    if not _has_flag(vllm_args, "--scheduler-cls"):
        argv += ["--scheduler-cls", SCHEDULER_CLS]
    if Policy(policy) is Policy.SMALLEST_BUDGET and not _has_flag(vllm_args, "--scheduling-policy"):
        argv += ["--scheduling-policy", "priority"]  # the scheduler sets each request's priority from its budget
    if not _has_flag(vllm_args, "--dtype"):
        argv += ["--dtype", hw.default_dtype()]
    if not _has_flag(vllm_args, "--enforce-eager", "--no-enforce-eager"):
        argv += ["--enforce-eager"]  # compile warm-up takes minutes on small CPUs
    # Per-request visual_keep travels in mm_processor_kwargs, which vLLM refuses unless trusted; flopwise
    # trusts it and gates the other keys itself, unless the operator passed the flag (then vLLM's rules).
    gate = not _has_flag(vllm_args, "--trust-request-mm-kwargs")
    if gate:
        argv += ["--trust-request-mm-kwargs"]
    argv += vllm_args
    env = hw.engine_env()
    # Endpoint plugins load only when named in VLLM_PLUGINS, which then also allow-lists general plugins.
    named = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(named + list(PLUGIN_NAMES)))
    env[POLICY_ENV] = Policy(policy).value
    for key, value in ((DEFAULT_BUDGET_ENV, default_budget), (MAX_BUDGET_ENV, max_budget)):
        if value is not None:
            env[key] = repr(float(value))
        else:
            env.pop(key, None)
    for key, value in ((MM_KWARGS_GATE_ENV, "1" if gate else None),
                       (DEFAULT_REJECTION_ENV, early_rejection), (DEFAULT_PRM_ENV, prm),
                       (DEFAULT_KEEP_ENV, None if visual_keep is None else repr(float(visual_keep))),
                       (DEFAULT_METHOD_ENV, visual_drop),
                       (DEFAULT_LAYER_ENV, None if visual_drop_layer is None else str(visual_drop_layer)),
                       *kv_defaults(None, None, None).items(), *(kv or {}).items()):
        if value is not None:
            env[key] = value
        else:
            env.pop(key, None)
    return argv, env


def kv_defaults(policy: str | None, keep: float | None, tokens: int | None) -> dict[str, str | None]:
    """``--kv-policy`` / ``--kv-keep`` / ``--kv-keep-tokens`` checked like a request's fields, as the env the
    engine reads its defaults from; raises ValueError naming the flag."""
    from flopwise.techniques import kv_drop as kd

    env: dict[str, str | None] = {kd.DEFAULT_POLICY_ENV: None, kd.DEFAULT_KEEP_ENV: None, kd.DEFAULT_TOKENS_ENV: None}
    if policy is None and keep is None and tokens is None:
        return env
    try:
        config = kd.parse_options(policy or kd.DEFAULT_POLICY, keep if keep is not None or tokens is not None else 1.0,
                                  tokens)
    except kd.KVDropError as e:
        raise ValueError(f"--{e.field.replace('_', '-')}: {e}") from None
    env[kd.DEFAULT_POLICY_ENV] = config.policy
    if config.tokens is not None:
        env[kd.DEFAULT_TOKENS_ENV] = str(config.tokens)
    else:
        env[kd.DEFAULT_KEEP_ENV] = repr(config.keep)
    return env


def rejection_default(text: str | None, prm: str | None) -> str | None:
    """``--early-rejection`` as canonical JSON, checked like a request's field; raises ValueError naming it."""
    import json

    from flopwise.prm import PRMError, resolve
    from flopwise.techniques.early_rejection import parse_config

    if prm is not None:
        try:
            resolve(prm)
        except PRMError as e:
            raise ValueError(f"--prm: {e}") from None
    if text is None:
        return None
    try:
        raw = json.loads(text)
        raw = {"prm": prm, **raw} if prm and isinstance(raw, dict) and "prm" not in raw else raw
        config = parse_config(raw, prefix="")
        resolve(config.prm)
    except (ValueError, PRMError) as e:  # bad JSON, a bad field (named), an unknown PRM
        raise ValueError(f"--early-rejection: {e}") from None
    return config.model_dump_json()


def cmd_serve(args, rest: list[str]) -> int:
    from flopwise.models import ModelNotFound, resolve_model

    if args.default_flop_budget and args.max_flop_budget and args.default_flop_budget > args.max_flop_budget:
        return fail("serve", f"--default-flop-budget {args.default_flop_budget:g} exceeds --max-flop-budget {args.max_flop_budget:g}")
    try:
        model = resolve_model(args.model)
        FlopModel.from_pretrained(model)  # an architecture the ledger cannot cost is refused up front
        rejection = rejection_default(args.early_rejection, args.prm)
        kv = kv_defaults(args.kv_policy, args.kv_keep, args.kv_keep_tokens)
    except (LedgerError, ModelNotFound, ValueError) as e:
        return fail("serve", str(e))
    argv, env = serve_command(model, rest, args.host, args.port, args.default_flop_budget, args.max_flop_budget,
                              args.budget_policy, rejection, args.prm, args.visual_keep, args.visual_drop,
                              args.visual_drop_layer, kv)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)  # same PID: whoever started `flopwise serve` can stop the server
    return 0


# -- flopwise model ------------------------------------------------------------------------------------
def cmd_model(args) -> int:
    from flopwise.models import ModelNotFound, default_model_path

    try:
        print(default_model_path())
    except ModelNotFound as e:
        return fail("model", str(e))
    return 0


def _budget_args(p: argparse.ArgumentParser) -> None:
    from flopwise.budget import Policy

    p.add_argument("--default-flop-budget", type=flop_amount, default=None, help="budget for requests that set none")
    p.add_argument("--max-flop-budget", type=flop_amount, default=None, help="refuse requests asking for more (HTTP 400)")
    p.add_argument("--budget-policy", choices=[x.value for x in Policy], default=Policy.FIFO.value,
                   help="admission order: vLLM's FIFO, or smallest budget first so small requests do not queue behind huge ones")


def _round_args(p: argparse.ArgumentParser, rounds: int, out: str) -> None:
    """The workload of benchmarks that alternate rounds between stock vLLM and flopwise."""
    p.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--requests", type=positive_int, default=32, help="completions in flight per round")
    p.add_argument("--prompt-tokens", type=positive_int, default=256)
    p.add_argument("--output-tokens", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=rounds)
    p.add_argument("--out", default=out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="FLOP-aware inference middleware for vLLM.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("flops", help="FLOPs of one request from the ledger (a model dir or config.json is enough)")
    f.add_argument("model", nargs="?", help="model dir or config.json (default: the embedded SmolLM2-135M-Instruct)")
    f.add_argument("--prompt-tokens", type=positive_int, required=True, help="text tokens in the prompt")
    f.add_argument("--output-tokens", type=positive_int, required=True, help="tokens generated")
    f.add_argument("--images", type=non_negative_int, default=0, help="images in the prompt (VLMs); each adds its placeholder tokens")
    f.add_argument("--image-size", type=positive_int, default=448, help="image side in pixels for Qwen2-VL (LLaVA's is fixed)")
    f.add_argument("--cached-tokens", type=non_negative_int, default=0, help="prompt tokens served from the prefix cache")
    f.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with flopwise on; other options go to vLLM",
                       description="Any option not listed here is passed to vLLM's server unchanged.")
    s.add_argument("model", nargs="?", help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=positive_int, default=8000)
    _budget_args(s)
    s.add_argument("--early-rejection", default=None, metavar="JSON",
                   help='default early_rejection for n>1 requests, e.g. \'{"every_tokens": 32, "keep": 0.5}\'')
    s.add_argument("--prm", default=None, help="default PRM for early rejection (verifier:arithmetic, head:chain-sum, or a dir)")
    s.add_argument("--visual-keep", type=keep_ratio, default=None,
                   help="VLMs: fraction of each image's tokens the LM sees, for requests that set no visual_keep")
    s.add_argument("--visual-drop", type=visual_method, default=None,
                   help="VLMs: how image tokens are chosen: visiondrop (default), cls_attention, uniform, random")
    s.add_argument("--visual-drop-layer", type=non_negative_int, default=None,
                   help="LLaVA: drop inside the vision tower after this many layers (default: after the tower)")
    s.add_argument("--kv-policy", default=None,
                   help="KV dropping policy for requests that set none: snapkv (default), tova, h2o, streaming_llm, "
                   "knorm, random")
    s.add_argument("--kv-keep", type=float, default=None,
                   help="fraction of each prompt's KV kept after prefill, for requests that set no kv_keep")
    s.add_argument("--kv-keep-tokens", type=positive_int, default=None,
                   help="token budget for each request's KV instead of --kv-keep: the prompt is cut to it and "
                   "generation evicts its oldest blocks beyond it")

    bt = sub.add_parser("batch", help="offline generation over an OpenAI Batch API .jsonl file (resumable)",
                        description="Any option not listed here is passed to the vLLM engine unchanged.")
    bt.add_argument("input", help="input .jsonl: custom_id, method, url (/v1/chat/completions or /v1/completions), body")
    bt.add_argument("-o", "--output", required=True, help="output .jsonl; rerunning with the same file resumes")
    bt.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    bt.add_argument("--flop-budget", type=flop_amount, default=None, help="FLOP budget for lines that set none")
    bt.add_argument("--max-concurrency", type=positive_int, default=256, help="requests in flight at once (without --ray)")
    r = bt.add_argument_group("Ray (pip install 'flopwise[ray]')")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: HOST:PORT of its head, 'auto', or nothing for a new local instance")
    r.add_argument("--replicas", type=positive_int, default=None, help="vLLM engines on the cluster (default 1)")
    r.add_argument("--cpus-per-replica", type=positive_float, default=None, help="CPUs each engine holds (default 1)")
    r.add_argument("--batch-size", type=positive_int, default=None,
                   help="lines per Ray task: a lost replica's unfinished tasks are redone (default 32)")
    r.add_argument("--concurrent-batches", type=positive_int, default=None,
                   help="tasks in flight per replica (default 4): batch size x this = requests its engine batches")

    d = sub.add_parser("demo", help="start the server on the default model, send chat requests, print FLOPs, stop")
    d.add_argument("--port", type=positive_int, default=8765)
    d.add_argument("--max-tokens", type=positive_int, default=48)

    b = sub.add_parser("bench", help="benchmarks against stock vLLM (results under bench/results/)")
    bsub = b.add_subparsers(dest="bench", required=True)
    o = bsub.add_parser("overhead", help="stock vLLM vs vLLM with flopwise and every technique off")
    _round_args(o, rounds=5, out="bench/results/overhead.md")
    bb = bsub.add_parser("budget", help="budgets on vs stock vLLM, overshoot, small-request latency per policy")
    _round_args(bb, rounds=3, out="bench/results/budget.md")
    bb.add_argument("--probe-requests", type=positive_int, default=60)
    bb.add_argument("--huge", type=positive_int, default=6)
    bb.add_argument("--small", type=positive_int, default=24)
    bb.add_argument("--latency-reps", type=positive_int, default=2)
    be = bsub.add_parser("early-rejection", help="best-of-N vs early rejection with PRMs on reasoning-gym chain_sum")
    be.add_argument("--model", default=None, help="generator (default: the chain_sum fine-tune of SmolLM2)")
    be.add_argument("--problems", type=positive_int, default=40)
    be.add_argument("--prm", nargs="+", default=["verifier:arithmetic", "head:chain-sum"])
    be.add_argument("--best-of", type=positive_int, nargs="+", default=[4, 8, 16])
    be.add_argument("--er-n", type=positive_int, nargs="+", default=[8, 16])
    be.add_argument("--every-steps", type=positive_int, nargs="*", default=[1], help="checkpoints every k steps (lines)")
    be.add_argument("--step-cap", type=positive_int, default=48, help="every_tokens with --every-steps: the most tokens between checkpoints")
    be.add_argument("--every", type=positive_int, nargs="*", default=[16], help="checkpoints every k tokens")
    be.add_argument("--keep", type=float, nargs="+", default=[0.25])
    be.add_argument("--max-tokens", type=positive_int, default=96)
    be.add_argument("--block-size", type=positive_int, default=32, help="KV block size (multiple of 32 on CPU)")
    be.add_argument("--stock-n", type=positive_int, default=8)
    be.add_argument("--out", default="bench/results/early_rejection.md")
    bc = bsub.add_parser("convert", help="SQA and MoE-merge checkpoints vs their originals: FLOPs, vLLM throughput, perplexity")
    bc.add_argument("--model", default=None, help="model for query-head reduction (default: the embedded SmolLM2)")
    bc.add_argument("--moe-model", default="bench/models/tiny-moe", help="MoE model (default: the committed tiny MoE)")
    bc.add_argument("--distill-steps", type=non_negative_int, default=40)
    bc.add_argument("--long-distill-steps", type=non_negative_int, default=0,
                    help="also a merge variant distilled this many steps (0: none)")
    bc.add_argument("--prefill-requests", type=positive_int, default=4)
    bc.add_argument("--prefill-tokens", type=positive_int, default=4000)
    bc.add_argument("--reuse", action="store_true", help="keep checkpoints an earlier run converted with the same settings")
    bc.add_argument("--decode-requests", type=positive_int, default=32)
    bc.add_argument("--decode-tokens", type=positive_int, default=128)
    bc.add_argument("--out", default="bench/results/convert.md")

    bs = bsub.add_parser("scale", help="flopwise batch --ray: one vs several engine replicas on this machine, "
                         "lines and FLOPs per second")
    bs.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    bs.add_argument("--requests", type=positive_int, default=128)
    bs.add_argument("--prompt-chars", type=positive_int, default=600, help="characters of local text per prompt")
    bs.add_argument("--max-tokens", type=positive_int, default=64)
    bs.add_argument("--replicas", type=positive_int, default=2, help="replicas of the multi-replica setting")
    bs.add_argument("--batch-size", type=positive_int, default=32, help="lines per Ray task")
    bs.add_argument("--concurrent-batches", type=positive_int, default=4, help="Ray tasks in flight per replica")
    bs.add_argument("--out", default="bench/results/scale.md")

    bk = bsub.add_parser("kv", help="KV token dropping vs stock vLLM on SmolLM2-135M: attention FLOPs, KV blocks, "
                         "concurrency, wall time, retrieval and perplexity")
    bk.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    bk.add_argument("--policies", nargs="+", default=["snapkv", "tova", "h2o", "streaming_llm", "knorm", "random"],
                    help="KV policies (the first is also run at every keep ratio in the speed part)")
    bk.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="fractions of prompt KV kept")
    bk.add_argument("--questions", type=positive_int, default=16, help="retrieval prompts per context length")
    bk.add_argument("--retrieval-tokens", type=positive_int, nargs="+", default=[2000, 4000])
    bk.add_argument("--ppl-tokens", type=positive_int, nargs="+", default=[2048, 4096], help="perplexity context lengths")
    bk.add_argument("--docs", type=positive_int, default=4, help="perplexity documents per context length")
    bk.add_argument("--continuation", type=positive_int, default=128, help="tokens scored after each context")
    bk.add_argument("--reference", nargs="*", default=["snapkv", "tova"],
                    help="policies whose perplexity the transformers reference recomputes at keep 0.25")
    bk.add_argument("--requests", type=positive_int, default=32, help="speed part: requests in the batch")
    bk.add_argument("--prompt-tokens", type=positive_int, default=2000)
    bk.add_argument("--output-tokens", type=positive_int, default=128)
    bk.add_argument("--stock-fits", type=positive_int, default=8, help="KV pool size, in whole requests")
    bk.add_argument("--parts", nargs="+", choices=["retrieval", "perplexity", "speed"],
                    default=["retrieval", "perplexity", "speed"],
                    help="run only these parts; the others are kept from the existing JSON")
    bk.add_argument("--out", default="bench/results/kv.md")

    bv = bsub.add_parser("visual", help="visual token dropping vs stock vLLM on the tiny shapes LLaVA: FLOPs, wall, accuracy")
    bv.add_argument("--model", default=None, help="LLaVA model dir (default: bench/models/tiny-llava-shapes)")
    bv.add_argument("--questions", type=positive_int, default=64)
    bv.add_argument("--keep", type=keep_ratio, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    bv.add_argument("--methods", type=visual_method, nargs="+", default=["visiondrop", "cls_attention", "uniform", "random"])
    bv.add_argument("--reps", type=positive_int, default=2, help="timed runs per setting (the fastest counts)")
    bv.add_argument("--batch", type=positive_int, default=64, help="max_num_seqs of both engines")
    bv.add_argument("--speed-requests", type=non_negative_int, default=16,
                    help="requests per setting for the wall-time table at SmolLM2-135M's shape (0: skip it)")
    bv.add_argument("--out", default="bench/results/visual.md")

    cv = sub.add_parser("convert", help="offline checkpoint transforms whose output stock vLLM loads")
    cvsub = cv.add_subparsers(dest="transform", required=True)
    sq = cvsub.add_parser("sqa", help="fewer query heads (Sparse Query Attention) for Llama/Mistral/Qwen2/Qwen3")
    mm = cvsub.add_parser("moe-merge", help="fewer experts / lower top-k for Mixtral, Qwen2-MoE, Qwen3-MoE")
    for c in (sq, mm):
        c.add_argument("model", help="local HF model directory")
        c.add_argument("out", help="output directory (written atomically)")
        c.add_argument("--force", action="store_true", help="replace OUT if it exists")
        c.add_argument("--calib-blocks", type=positive_int, default=16, help="256-token blocks of local text for calibration")
        c.add_argument("--eval-blocks", type=positive_int, default=16, help="256-token blocks for perplexity before/after")
    sq.add_argument("--query-heads", type=positive_int, required=True, help="query heads to keep (a multiple of the KV heads)")
    sq.add_argument("--kv-heads", type=positive_int, default=None, help="KV heads to keep (divides the model's; default: all)")
    sq.add_argument("--method", choices=["select", "merge"], default="select")
    sq.add_argument("--distill-steps", type=non_negative_int, default=0, help="self-distillation steps (batch 4 x 256 tokens)")
    sq.add_argument("--lr", type=float, default=5e-5, help="distillation learning rate")
    mm.add_argument("--experts", type=positive_int, required=True,
                    help="experts to keep per MoE layer (all of them with a lower --top-k reduces top-k only)")
    mm.add_argument("--method", choices=["mc-smoe", "reap", "hc-smoe", "frequency", "uniform"], default="mc-smoe")
    mm.add_argument("--top-k", type=positive_int, default=None, help="experts per token after the merge (default: unchanged)")

    sub.add_parser("model", help="prepare the embedded default model and print its directory")

    tp = sub.add_parser("train-prm", help="fit a head PRM on SmolLM2 hidden states, labelled by the arithmetic verifier")
    tp.add_argument("--generator", default=None, help="model that samples the traces (default: the chain_sum fine-tune)")
    tp.add_argument("--base", default="default", help="model whose hidden states the head reads (default: embedded SmolLM2)")
    tp.add_argument("--problems", type=positive_int, default=200)
    tp.add_argument("--samples", type=positive_int, default=4, help="candidates sampled per problem")
    tp.add_argument("--max-tokens", type=positive_int, default=96)
    tp.add_argument("--out", default="src/flopwise/prm/heads/chain-sum")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "batch"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "flops":
        return cmd_flops(args)
    if args.command == "serve":
        return cmd_serve(args, rest)
    if args.command == "model":
        return cmd_model(args)
    if args.command == "convert":
        from flopwise_serve.convert import run_convert

        return run_convert(args)
    if args.command == "batch":
        from flopwise_serve.batch import run_batch

        return run_batch(args, rest)
    if args.command == "demo":
        from flopwise_serve.demo import run_demo

        return run_demo(port=args.port, max_tokens=args.max_tokens)
    if args.command == "train-prm":
        from flopwise_serve.train_prm import run_train_prm

        return run_train_prm(args)
    if args.command == "bench":
        from flopwise_serve.bench import run_bench

        return run_bench(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
