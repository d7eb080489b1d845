"""``flopwise bench …``: the benchmark commands' parsers, and their dispatch (each benchmark's module is
imported only when it runs)."""

from __future__ import annotations

import argparse
import importlib

from flopwise.techniques.kv_drop import policy_names
from flopwise_serve.common import keep_ratio, non_negative_int, positive_int, visual_method

# benchmark -> (module, function)
BENCHMARKS = {
    "overhead": ("flopwise_bench.overhead", "bench_overhead"),
    "budget": ("flopwise_bench.overhead", "bench_budget"),
    "convert": ("flopwise_bench.convert", "bench_convert"),
    "early-rejection": ("flopwise_bench.early_rejection", "bench_early_rejection"),
    "kv": ("flopwise_bench.kv_drop", "bench_kv"),
    "kv-decode": ("flopwise_bench.kv_decode", "bench_kv_decode"),
    "visual": ("flopwise_bench.visual_drop", "bench_visual"),
    "scale": ("flopwise_bench.scale", "bench_scale"),
}


def _round_args(parser: argparse.ArgumentParser, rounds: int, out: str) -> None:
    """The workload of benchmarks that alternate rounds between stock vLLM and flopwise."""
    parser.add_argument(
        "--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--requests", type=positive_int, default=32, help="completions in flight per round")
    parser.add_argument("--prompt-tokens", type=positive_int, default=256)
    parser.add_argument("--output-tokens", type=positive_int, default=128)
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--out", default=out)


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks against stock vLLM (results under bench/results/)")
    bsub = parser.add_subparsers(dest="bench", required=True)
    overhead = bsub.add_parser("overhead", help="stock vLLM vs vLLM with flopwise and every technique off")
    _round_args(overhead, rounds=5, out="bench/results/overhead.md")
    budget = bsub.add_parser(
        "budget", help="budgets on vs stock vLLM, overshoot, small-request latency per policy"
    )
    _round_args(budget, rounds=3, out="bench/results/budget.md")
    budget.add_argument("--probe-requests", type=positive_int, default=60)
    budget.add_argument("--huge", type=positive_int, default=6)
    budget.add_argument("--small", type=positive_int, default=24)
    budget.add_argument("--latency-reps", type=positive_int, default=2)
    early_rejection = bsub.add_parser(
        "early-rejection",
        help="best-of-N vs early rejection (verifier, confidence, self head) on long chain sums",
    )
    early_rejection.add_argument(
        "--model", default=None, help="generator (default: the chain_sum fine-tune of SmolLM2)"
    )
    early_rejection.add_argument("--problems", type=positive_int, default=200)
    early_rejection.add_argument("--best-of", type=positive_int, nargs="+", default=[4, 8])
    early_rejection.add_argument(
        "--derive",
        type=positive_int,
        nargs="*",
        default=[1, 2],
        help="best-of-N read off the largest measured best-of-N's first N candidates (same seeds)",
    )
    early_rejection.add_argument(
        "--settings",
        nargs="*",
        default=None,
        help="early-rejection settings by name (flopwise_bench.early_rejection.SETTINGS; default: "
        "DEFAULT_SETTINGS)",
    )
    early_rejection.add_argument("--max-tokens", type=positive_int, default=256)
    early_rejection.add_argument(
        "--block-size", type=positive_int, default=32, help="KV block size (multiple of 32 on CPU)"
    )
    early_rejection.add_argument("--out", default="bench/results/early_rejection.md")
    early_rejection.add_argument(
        "--report-only", action="store_true", help="write the .md and .png again from the .json (no engine)"
    )
    convert = bsub.add_parser(
        "convert", help="SQA and MoE-merge checkpoints vs their originals: FLOPs, vLLM throughput, quality"
    )
    convert.add_argument(
        "--model", default=None, help="model for query-head reduction (default: the embedded SmolLM2)"
    )
    convert.add_argument(
        "--moe-model", default="bench/models/tiny-moe", help="MoE model (default: the committed tiny MoE)"
    )
    convert.add_argument(
        "--parts",
        nargs="+",
        choices=["sqa", "speed", "retrieval", "moe"],
        default=["sqa", "speed", "retrieval", "moe"],
        help="run only these parts; the others are kept from the existing JSON",
    )
    convert.add_argument("--calib-blocks", type=positive_int, default=64)
    convert.add_argument(
        "--distill-steps", type=positive_int, default=360, help="the long distillation's steps"
    )
    convert.add_argument("--eval-every", type=positive_int, default=40)
    convert.add_argument(
        "--sqa-distilled",
        default=None,
        help="report this already distilled checkpoint (its flopwise_report.json) instead of distilling one",
    )
    convert.add_argument("--prefill-tokens", type=positive_int, nargs="+", default=[4000, 8000])
    convert.add_argument("--repeats", type=positive_int, default=3)
    convert.add_argument("--decode-requests", type=positive_int, default=32)
    convert.add_argument("--decode-tokens", type=positive_int, default=128)
    convert.add_argument("--retrieval-tokens", type=positive_int, default=2000)
    convert.add_argument("--questions", type=positive_int, default=100)
    convert.add_argument(
        "--reuse",
        action="store_true",
        help="keep checkpoints an earlier run converted with the same settings",
    )
    convert.add_argument("--out", default="bench/results/convert.md")

    scale = bsub.add_parser(
        "scale",
        help="flopwise batch --ray: one vs several engine replicas on this machine, "
        "lines and FLOPs per second",
    )
    scale.add_argument(
        "--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    scale.add_argument("--requests", type=positive_int, default=128)
    scale.add_argument(
        "--prompt-chars", type=positive_int, default=600, help="characters of local text per prompt"
    )
    scale.add_argument("--max-tokens", type=positive_int, default=64)
    scale.add_argument(
        "--replicas", type=positive_int, default=2, help="replicas of the multi-replica setting"
    )
    scale.add_argument("--batch-size", type=positive_int, default=32, help="lines per Ray task")
    scale.add_argument(
        "--concurrent-batches", type=positive_int, default=4, help="Ray tasks in flight per replica"
    )
    scale.add_argument("--out", default="bench/results/scale.md")

    kv = bsub.add_parser(
        "kv",
        help="KV token dropping vs stock vLLM on SmolLM2-135M: attention FLOPs, KV blocks, "
        "concurrency, wall time, retrieval and perplexity",
    )
    kv.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    kv.add_argument(
        "--policies",
        nargs="+",
        default=["snapkv", "tova", "h2o", "streaming_llm", "knorm", "random"],
        help="KV policies (the first is also run at every keep ratio in the speed part)",
    )
    kv.add_argument(
        "--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="fractions of prompt KV kept"
    )
    kv.add_argument("--questions", type=positive_int, default=16, help="retrieval prompts per context length")
    kv.add_argument("--retrieval-tokens", type=positive_int, nargs="+", default=[2000, 4000])
    kv.add_argument(
        "--ppl-tokens", type=positive_int, nargs="+", default=[2048, 4096], help="perplexity context lengths"
    )
    kv.add_argument("--docs", type=positive_int, default=4, help="perplexity documents per context length")
    kv.add_argument("--continuation", type=positive_int, default=128, help="tokens scored after each context")
    kv.add_argument(
        "--reference",
        nargs="*",
        default=["snapkv", "tova"],
        help="policies whose perplexity the transformers reference recomputes at keep 0.25",
    )
    kv.add_argument("--requests", type=positive_int, default=32, help="speed part: requests in the batch")
    kv.add_argument("--prompt-tokens", type=positive_int, default=2000)
    kv.add_argument("--output-tokens", type=positive_int, default=128)
    kv.add_argument("--stock-fits", type=positive_int, default=8, help="KV pool size, in whole requests")
    kv.add_argument(
        "--parts",
        nargs="+",
        choices=["retrieval", "perplexity", "speed"],
        default=["retrieval", "perplexity", "speed"],
        help="run only these parts; the others are kept from the existing JSON",
    )
    kv.add_argument("--out", default="bench/results/kv.md")

    kvd = bsub.add_parser(
        "kv-decode",
        help="KV dropping while decoding vs stock vLLM: decode throughput at long context, and the "
        "perplexity of long generations under a token budget",
    )
    kvd.add_argument("--model", default=None, help="model dir (default: the embedded SmolLM2-135M-Instruct)")
    kvd.add_argument(
        "--policies",
        nargs="+",
        default=["snapkv", "tova", "h2o", "streaming_llm", "knorm"],
        choices=policy_names(),
        help="KV policies of the speed part",
    )
    kvd.add_argument(
        "--keep", type=keep_ratio, nargs="+", default=[0.25, 0.1], help="fractions of prompt KV kept"
    )
    kvd.add_argument(
        "--requests", type=positive_int, default=16, help="speed part: requests decoding together"
    )
    kvd.add_argument("--prompt-tokens", type=positive_int, default=3000)
    kvd.add_argument("--output-tokens", type=positive_int, default=256)
    kvd.add_argument("--docs", type=positive_int, default=16, help="long-generation part: documents")
    kvd.add_argument(
        "--context", type=positive_int, default=512, help="tokens before the forced continuation"
    )
    kvd.add_argument(
        "--continuation", type=positive_int, default=1536, help="tokens teacher-forced and scored"
    )
    kvd.add_argument(
        "--budget", type=positive_int, default=512, help="kv_keep_tokens of the long generations"
    )
    kvd.add_argument(
        "--long-policies",
        nargs="+",
        default=["streaming_llm", "snapkv", "tova", "h2o", "knorm"],
        help="policies of the long-generation part",
    )
    kvd.add_argument(
        "--parts",
        nargs="+",
        choices=["speed", "long"],
        default=["speed", "long"],
        help="run only these parts; the other is kept from the existing JSON",
    )
    kvd.add_argument("--out", default="bench/results/kv_decode.md")

    visual = bsub.add_parser(
        "visual", help="visual token dropping vs stock vLLM on the tiny scenes LLaVA: FLOPs, wall, accuracy"
    )
    visual.add_argument(
        "--model", default=None, help="LLaVA model dir (default: bench/models/tiny-vlm-scenes)"
    )
    visual.add_argument("--questions", type=positive_int, default=400, help="held-out questions (5 kinds)")
    visual.add_argument("--keep", type=keep_ratio, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    visual.add_argument(
        "--methods",
        type=visual_method,
        nargs="+",
        default=["visiondrop", "cls_attention", "divprune", "visionzip", "cdpruner", "uniform", "random"],
    )
    visual.add_argument(
        "--reps", type=positive_int, default=2, help="timed runs per setting (the fastest counts)"
    )
    visual.add_argument("--batch", type=positive_int, default=64, help="max_num_seqs of both engines")
    visual.add_argument(
        "--speed-requests",
        type=non_negative_int,
        default=16,
        help="requests per setting for the wall-time table at SmolLM2-135M's shape (0: skip it)",
    )
    visual.add_argument("--out", default="bench/results/visual.md")
    parser.set_defaults(run=lambda args, rest: run_bench(args))


def run_bench(args) -> int:
    module, function = BENCHMARKS[args.bench]
    return getattr(importlib.import_module(module), function)(args)
