"""``flopwise bench kv-decode``: KV dropping where long generations spend their time, on SmolLM2-135M.

Two parts, each engine in its own process (stock with ``VLLM_PLUGINS=""``: no flopwise code), the engine
core in the worker's process so the scheduler can be read between steps:

* **Decode speed**: ``requests`` requests of ``prompt`` + ``output`` tokens submitted at once into a pool
  that holds them all (the same batch decodes in every setting). Every step is timed; a step is a decode
  step when no request is prefilling or waiting (the scheduler, read before it). Decode throughput = the
  tokens those steps produce over their time; prefill = the rest; plus end-to-end wall. Stock vLLM runs
  before and after flopwise (the faster is the reference); flopwise runs no drop, every policy at each keep
  ratio, and the first policy under a token budget (re-scored while decoding).
* **Long generation**: teacher-forced perplexity of a ``continuation``-token text after a short context,
  under a ``budget``-token KV budget that the request reaches while decoding (scored policies re-score
  their kept context each time it is a block over; StreamingLLM evicts), against the full cache; per
  document, with a paired bootstrap interval of the perplexity ratio.

Writes ``bench/results/kv_decode.md`` with a PNG plot and the raw JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from flopwise import hw
from flopwise_bench.common import run_worker
from flopwise_bench.kv_drop import make_engine

POLICIES = ["snapkv", "tova", "h2o", "streaming_llm", "knorm", "random"]
BLOCK = 128  # vLLM's CPU default block size
PARTS = ("speed", "long")


def _extra(setting: dict) -> dict | None:
    if setting["policy"] in ("full", "stock"):
        return None
    if setting.get("tokens"):
        return {"kv_policy": setting["policy"], "kv_keep_tokens": setting["tokens"]}
    return {"kv_policy": setting["policy"], "kv_keep": setting["keep"]}


def _docs(tok, count: int, tokens: int, first_seed: int) -> list[list[int]]:
    from flopwise import longctx

    return [
        tok.encode("\n\n".join(longctx.prose(tok, tokens + 64, first_seed + i)), add_special_tokens=False)[
            :tokens
        ]
        for i in range(count)
    ]


def speed(spec: dict) -> dict:
    """Each setting's batch through one engine; every step timed and classed as decode or not."""
    from vllm import SamplingParams

    llm = make_engine(
        spec["model"],
        spec["stock"],
        max_model_len=spec["prompt"] + spec["output"] + 256,
        max_num_seqs=spec["requests"],
    )
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    prompts = [
        {"prompt_token_ids": ids}
        for ids in _docs(llm.get_tokenizer(), spec["requests"], spec["prompt"], 3000)
    ]
    warm = SamplingParams(max_tokens=4, temperature=0)
    llm.generate(
        [{"prompt_token_ids": p["prompt_token_ids"][:256]} for p in prompts[:4]], warm, use_tqdm=False
    )
    engine, rows = llm.llm_engine, []
    for s in spec["settings"]:
        params = SamplingParams(
            max_tokens=spec["output"], temperature=0, ignore_eos=True, extra_args=_extra(s)
        )
        decode_s = decode_tokens = 0.0
        outs = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"{s['name']}-{i}", p, params)
        while engine.has_unfinished_requests():
            decoding = not scheduler.waiting and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running
            )
            running, t = len(scheduler.running), time.perf_counter()
            outs += [o for o in engine.step() if o.finished]
            if decoding:
                decode_s += time.perf_counter() - t
                decode_tokens += running
        wall = time.perf_counter() - t0
        kv = [((o.ec_transfer_params or {}).get("flopwise") or {}).get("kv") or {} for o in outs]
        rows.append(
            {
                **s,
                "wall_s": wall,
                "decode_s": decode_s,
                "decode_tokens": decode_tokens,
                "kept_tokens": sum(k.get("kept_tokens", spec["prompt"]) for k in kv) / len(outs),
                "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows}


def long_generation(spec: dict) -> dict:
    """Per document and setting: the forced continuation's mean negative log-likelihood."""
    from vllm import SamplingParams

    n_ctx, n_cont = spec["context"], spec["continuation"]
    llm = make_engine(spec["model"], False, max_model_len=n_ctx + n_cont + 64, max_num_seqs=spec["docs"])
    docs = _docs(llm.get_tokenizer(), spec["docs"], n_ctx + n_cont, 4000)
    out = {}
    for s in spec["settings"]:
        params = [
            SamplingParams(
                max_tokens=n_cont,
                temperature=0,
                logprobs=0,
                extra_args={**(_extra(s) or {}), "force_tokens": d[n_ctx:]},
            )
            for d in docs
        ]
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": d[:n_ctx]} for d in docs], params, use_tqdm=False)
        nll = [
            sum(-lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, d[n_ctx:])) / n_cont
            for o, d in zip(res, docs)
        ]
        kv = [(o.ec_transfer_params or {}).get("flopwise", {}).get("kv") or {} for o in res]
        out[s["name"]] = {**s, "nll": nll, "kv": kv, "wall_s": time.perf_counter() - t0}
        print(s["name"], f"{math.exp(sum(nll) / len(nll)):.3f}", file=sys.stderr, flush=True)
    return out


def _run_worker(kind: str, spec: dict, stock: bool, log: Path) -> dict:
    return run_worker("flopwise_bench.kv_decode", {**spec, "kind": kind}, stock, log, timeout=7200)


def bench_kv_decode(args) -> int:
    from flopwise.models import ModelNotFound, resolve_model

    try:
        model = resolve_model(args.model)
    except ModelNotFound as e:
        print(f"flopwise bench kv-decode: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    if set(args.parts) == set(PARTS):
        log.unlink(missing_ok=True)
    kept_args = {k: v for k, v in vars(args).items() if not callable(v) and k != "parts"}
    # A partial run (--parts) replaces its part in the committed JSON and keeps the other (same machine).
    json_path = out.with_suffix(".json")
    result = json.loads(json_path.read_text()) if set(args.parts) != set(PARTS) else {}
    result.update(hardware=hw.describe())
    result["args"] = {**result.get("args", {}), **kept_args}
    budget = round(0.25 * args.prompt_tokens)
    settings = (
        [{"name": "flopwise, no drop", "policy": "full", "keep": 1.0}]
        + [{"name": f"{p} {k}", "policy": p, "keep": k} for p in args.policies for k in args.keep]
        + [{"name": f"{args.policies[0]} {budget} tokens", "policy": args.policies[0], "tokens": budget}]
    )
    s_spec = {
        "model": model,
        "requests": args.requests,
        "prompt": args.prompt_tokens,
        "output": args.output_tokens,
    }
    s_spec["kv_cache_gib"] = math.ceil(
        args.requests * (args.prompt_tokens + args.output_tokens + BLOCK) * 48e3 / 2**30
    )
    stock = {**s_spec, "settings": [{"name": "stock vLLM", "policy": "stock", "keep": 1.0}]}
    if "speed" in args.parts:
        print(
            f"decode speed: {args.requests} x {args.prompt_tokens}+{args.output_tokens} tokens ...",
            flush=True,
        )
        rows = _run_worker("speed", stock, True, log)["rows"]
        rows += _run_worker("speed", {**s_spec, "settings": settings}, False, log)["rows"]
        rows += _run_worker("speed", stock, True, log)["rows"]
        result["speed"] = rows
    g_settings = [{"name": "full", "policy": "full"}] + [
        {"name": f"{p} {args.budget}", "policy": p, "tokens": args.budget} for p in args.long_policies
    ]
    g_spec = {
        "model": model,
        "docs": args.docs,
        "context": args.context,
        "continuation": args.continuation,
        "settings": g_settings,
        "kv_cache_gib": 4,
    }
    if "long" in args.parts:
        print(
            f"long generation: {args.docs} x {args.context}+{args.continuation} forced tokens ...", flush=True
        )
        result["long"] = _run_worker("long", g_spec, False, log)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_report(result, out)
    print(f"wrote {out}")
    return 0


def write_report(result: dict, out: Path) -> None:
    from flopwise_bench.common import versions
    from flopwise_bench.stats import paired_ci

    args, rows, long = result["args"], result["speed"], result["long"]
    stocks = [r for r in rows if r["policy"] == "stock"]
    ref = max(stocks, key=lambda r: r["decode_tokens"] / r["decode_s"])
    ref_tps, ref_wall = ref["decode_tokens"] / ref["decode_s"], min(r["wall_s"] for r in stocks)
    lines = [
        "# KV dropping while decoding: decode speed and long generations",
        "",
        f"Hardware: {result['hardware']}. {versions()}. Model: SmolLM2-135M-Instruct ({hw.default_dtype()}), "
        f"block size {BLOCK}, prefix caching off. Made by `flopwise bench kv-decode`; raw numbers in "
        "kv_decode.json. Each part in one run (`--parts` reruns one and keeps the other).",
        "",
        "## Decode speed",
        "",
        f"{args['requests']} requests of {args['prompt_tokens']} prompt + {args['output_tokens']} "
        "generated tokens (docstring prose) submitted at once, greedy, in a KV pool that holds them all. "
        "A decode step is one where no request is prefilling (read from the scheduler before the step); "
        "decode throughput = the tokens of those steps over their time, prefill = the rest of the wall time. "
        "Stock vLLM ran before and after flopwise: decode "
        + " / ".join(f"{r['decode_tokens'] / r['decode_s']:.1f}" for r in stocks)
        + " tokens/s (the faster is the reference).",
        "",
        "| setting | prompt KV kept | decode tokens/s | vs stock | prefill + rest s | wall s "
        "| wall vs stock |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [ref, *[r for r in rows if r["policy"] != "stock"]]:
        tps = r["decode_tokens"] / r["decode_s"]
        lines.append(
            f"| {r['name']} | {r['kept_tokens'] / args['prompt_tokens']:.2f} | {tps:.1f} | "
            f"{tps / ref_tps:.2f}x | {r['wall_s'] - r['decode_s']:.1f} | {r['wall_s']:.1f} | "
            f"{ref_wall / r['wall_s']:.2f}x |"
        )
    by = {r["name"]: r for r in rows}
    first = args["policies"][0]
    at = by.get(f"{first} 0.25")
    lines += ["", "Targets:", ""]
    if at:
        x = at["decode_tokens"] / at["decode_s"] / ref_tps
        lines.append(
            f"- decode ≥ 1.5x stock at keep 0.25 ({first}): {x:.2f}x — {'met' if x >= 1.5 else 'not met'}."
        )
    worse = [r["name"] for r in rows if r["policy"] not in ("stock",) and r["wall_s"] > ref_wall]
    lines.append(
        "- no policy's end-to-end time worse than stock: "
        + ("met." if not worse else f"not met ({', '.join(worse)} slower than stock's {ref_wall:.1f} s).")
    )
    full = long["full"]["nll"]
    lines += [
        "",
        "## Long generation under a token budget",
        "",
        f"{args['docs']} prose documents: {args['context']} tokens of context, then the next "
        f"{args['continuation']} tokens teacher-forced (vLLM's log-probabilities of the forced tokens) with "
        f"kv_keep_tokens {args['budget']}: the request passes the budget while decoding, so scored policies "
        "re-score their kept context (prompt survivors + generated tokens) each time it is a block over, and "
        "StreamingLLM evicts its oldest tail block. Perplexity ratio to the full cache with a 95% paired "
        "bootstrap interval over documents.",
        "",
        "| setting | perplexity | vs full | 95% CI | re-scorings per document | KV tokens kept at the end |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in long.items():
        ppl = math.exp(sum(v["nll"]) / len(v["nll"]))
        lo, hi = paired_ci(v["nll"], full) if name != "full" else (0.0, 0.0)
        diff = sum(v["nll"]) / len(v["nll"]) - sum(full) / len(full)
        comp = sum(k.get("compactions", 0) for k in v["kv"]) / len(v["kv"])
        # what the engine dropped and evicted (its usage.flops.kv), off the whole text
        gone = ("dropped_tokens", "decode_dropped_tokens", "evicted_tokens")
        kept = (
            args["context"]
            + args["continuation"]
            - sum(k.get(g, 0) for k in v["kv"] for g in gone) / len(v["kv"])
        )
        lines.append(
            f"| {name} | {ppl:.3f} | {math.exp(diff):.4f} | [{math.exp(lo):.4f}, {math.exp(hi):.4f}] | "
            f"{comp:.1f} | {kept:.0f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    _plot(result, out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["speed"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["name"] for r in rows]
    ax.barh(names, [r["decode_tokens"] / r["decode_s"] for r in rows])
    ax.set(xlabel="decode tokens/s")
    ax.invert_yaxis()
    fig.suptitle(f"Decode throughput, SmolLM2-135M ({result['hardware']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def rewrite_report(out: Path = Path("bench/results/kv_decode.md")) -> None:
    write_report(json.loads(out.with_suffix(".json").read_text()), out)


if __name__ == "__main__":  # a worker: python -m flopwise_bench.kv_decode SPEC_JSON
    spec = json.loads(sys.argv[1])
    from flopwise_serve.offline import set_engine_env

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.get("kv_cache_gib", 1))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, read between steps
    set_engine_env()
    data = speed(spec) if spec["kind"] == "speed" else long_generation(spec)
    Path(spec["result"]).write_text(json.dumps(data))
