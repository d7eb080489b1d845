"""``flopwise bench kv``: KV token dropping vs stock vLLM on the embedded SmolLM2-135M, in one run.

Three parts, each engine in its own process (the stock one with ``VLLM_PLUGINS=""``: no flopwise code):

* **Quality** (flopwise engine, prefix caching off so every request drops its own KV): needle retrieval
  (:mod:`flopwise.longctx`, one code line hidden in docstring prose, asked back at the end) at each
  context length, and perplexity of a continuation decoded against the kept cache (teacher-forced with
  :class:`flopwise_vllm.forcing.ForcedContinuation`), for every policy x keep ratio. The transformers
  reference scores the same continuation for the best two policies at 25% (float32, same kept positions).
* **Speed and memory**: the same batch of long requests through stock vLLM, flopwise at keep 1 and each
  setting, with the KV pool capped so that stock vLLM holds only a few requests at once. Per run: wall
  time, peak requests running and peak KV blocks in use (vLLM's own gauges, read after every step),
  decode attention FLOPs (the ledger on the kept context the engine reports).

Writes ``bench/results/kv.md`` with a PNG plot and the raw JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from flopwise import hw
from flopwise.ledger import FlopModel
from flopwise_bench.common import run_worker

POLICIES = ["snapkv", "tova", "h2o", "streaming_llm", "knorm", "random"]
KEEPS = [0.5, 0.25, 0.1]
BLOCK = 128  # vLLM's CPU default block size
PARTS = ("retrieval", "perplexity", "speed")


def _settings(policies: list[str], keeps: list[float]) -> list[dict]:
    return [{"policy": "full", "keep": 1.0}] + [{"policy": p, "keep": k} for p in policies for k in keeps]


def _extra(setting: dict) -> dict | None:
    return (
        None
        if setting["policy"] in ("full", "stock")
        else {"kv_policy": setting["policy"], "kv_keep": setting["keep"]}
    )


def make_engine(model: str, stock: bool, **kwargs):
    """An offline engine on ``model``: stock vLLM, or with flopwise's scheduler and the forcing processor."""
    from vllm import LLM

    base = dict(
        dtype=hw.default_dtype(), enforce_eager=True, seed=0, enable_prefix_caching=False, block_size=BLOCK
    )
    if stock:
        return LLM(model, **base, **kwargs)
    from flopwise_vllm import SCHEDULER_CLS
    from flopwise_vllm.forcing import ForcedContinuation

    return LLM(model, scheduler_cls=SCHEDULER_CLS, logits_processors=[ForcedContinuation], **base, **kwargs)


def quality(spec: dict) -> dict:
    """Retrieval accuracy and forced-continuation perplexity for every setting, one engine, one batch each."""
    from vllm import SamplingParams

    from flopwise import longctx

    llm = make_engine(spec["model"], False, max_model_len=spec["max_model_len"], max_num_seqs=32)
    tok = llm.get_tokenizer()
    settings = spec["settings"]
    retrieval, perplexity = {}, {}
    for tokens in spec["retrieval_tokens"] if "retrieval" in spec["parts"] else ():
        needles = [longctx.needle_prompt(tok, tokens, seed, needles=1) for seed in range(spec["questions"])]
        prompts, params = [], []
        for s in settings:
            for n in needles:
                prompts.append(n.prompt)
                params.append(SamplingParams(max_tokens=6, temperature=0, extra_args=_extra(s)))
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        print(f"retrieval {tokens}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for i, s in enumerate(settings):
            batch = outs[i * len(needles) : (i + 1) * len(needles)]
            right = sum(longctx.answered(o.outputs[0].text, n) for o, n in zip(batch, needles))
            retrieval[f"{s['policy']}@{s['keep']}@{tokens}"] = {
                "accuracy": right / len(needles),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in batch) / len(batch),
                "kv": [o.ec_transfer_params["flopwise"].get("kv") for o in batch],
            }
    for tokens in spec["ppl_tokens"] if "perplexity" in spec["parts"] else ():
        docs = _ppl_docs(tok, tokens, spec["docs"], spec["continuation"])
        prompts, params = [], []
        for s in settings:
            for context, cont in docs:
                prompts.append({"prompt_token_ids": context})
                params.append(
                    SamplingParams(
                        max_tokens=len(cont),
                        temperature=0,
                        logprobs=0,
                        extra_args={**(_extra(s) or {}), "force_tokens": cont},
                    )
                )
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        print(f"perplexity {tokens}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for i, s in enumerate(settings):
            batch = outs[i * len(docs) : (i + 1) * len(docs)]
            nll = [
                -lp[t].logprob
                for o, (_, cont) in zip(batch, docs)
                for lp, t in zip(o.outputs[0].logprobs, cont)
            ]
            perplexity[f"{s['policy']}@{s['keep']}@{tokens}"] = {"ppl": math.exp(sum(nll) / len(nll))}
    return {"retrieval": retrieval, "perplexity": perplexity}


def _ppl_docs(tok, tokens: int, count: int, continuation: int) -> list[tuple[list[int], list[int]]]:
    from flopwise import longctx

    docs = []
    for seed in range(count):
        ids = tok.encode(
            "\n\n".join(longctx.prose(tok, tokens + continuation + 64, 1000 + seed)), add_special_tokens=False
        )
        docs.append((ids[:tokens], ids[tokens : tokens + continuation]))
    return docs


def speed(spec: dict) -> dict:
    """One batch of long requests through one engine (stock or flopwise) per setting, in a capped KV pool."""
    from vllm import SamplingParams

    from flopwise import longctx

    llm = make_engine(
        spec["model"],
        spec["stock"],
        max_model_len=spec["prompt_tokens"] + spec["output_tokens"] + 256,
        max_num_seqs=spec["max_num_seqs"],
        num_gpu_blocks_override=spec["blocks"],
        disable_log_stats=False,
    )
    tok = llm.get_tokenizer()
    prompts = [
        {
            "prompt_token_ids": tok.encode(
                "\n\n".join(longctx.prose(tok, spec["prompt_tokens"], 2000 + i)), add_special_tokens=False
            )[: spec["prompt_tokens"]]
        }
        for i in range(spec["requests"])
    ]
    warm = SamplingParams(max_tokens=4, temperature=0)
    llm.generate(
        [{"prompt_token_ids": p["prompt_token_ids"][:256]} for p in prompts[:4]], warm, use_tqdm=False
    )
    engine = llm.llm_engine
    rows = []
    for s in spec["settings"]:
        params = SamplingParams(
            max_tokens=spec["output_tokens"], temperature=0, ignore_eos=True, extra_args=_extra(s)
        )
        peak_running = peak_usage = 0.0
        outs = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"{s['policy']}-{s['keep']}-{i}", p, params)
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
            gauges = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
            peak_running = max(peak_running, gauges.get("vllm:num_requests_running", 0))
            peak_usage = max(peak_usage, gauges.get("vllm:kv_cache_usage_perc", 0))
        wall = time.perf_counter() - t0
        kv = [((o.ec_transfer_params or {}).get("flopwise") or {}).get("kv") for o in outs]
        rows.append(
            {
                **s,
                "wall_s": wall,
                "peak_running": peak_running,
                "peak_blocks": round(peak_usage * spec["blocks"]),
                "dropped_tokens": [k["dropped_tokens"] if k else 0 for k in kv],
                "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                "output_tokens": [len(o.outputs[0].token_ids) for o in outs],
            }
        )
        print(
            json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list)}),
            file=sys.stderr,
            flush=True,
        )
    return {"rows": rows}


def _run_worker(kind: str, spec: dict, stock: bool, log: Path) -> dict:
    return run_worker("flopwise_bench.kv_drop", {**spec, "kind": kind}, stock, log, timeout=7200)


def _reference_ppl(model: str, spec: dict, policies: list[str]) -> dict:
    """The transformers reference's perplexity (float32) on the first context length, at keep 0.25."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flopwise.hf import kv as hk
    from flopwise.techniques import kv_drop as kd

    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokens = spec["ppl_tokens"][0]
    docs = _ppl_docs(tok, tokens, spec["docs"], spec["continuation"])
    out = {}
    for policy in ["full", *policies]:
        config = None if policy == "full" else kd.parse_options(policy, 0.25)
        nll = []
        for context, cont in docs:
            run = hk.generate(hf, context, config, len(cont), BLOCK, forced=cont)
            nll += [-lp for lp in run.logprobs]
        out[f"{policy}@{1.0 if policy == 'full' else 0.25}@{tokens}"] = {"ppl": math.exp(sum(nll) / len(nll))}
    return out


def bench_kv(args) -> int:
    from flopwise.models import ModelNotFound, resolve_model

    try:
        model = resolve_model(args.model)
    except ModelNotFound as e:
        print(f"flopwise bench kv: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    settings = _settings(args.policies, args.keep)
    parts = set(args.parts)
    # A partial run (--parts) replaces its parts in the committed JSON and keeps the others.
    result = json.loads(out.with_suffix(".json").read_text()) if parts != set(PARTS) else {}
    q_spec = {
        "model": model,
        "settings": settings,
        "questions": args.questions,
        "docs": args.docs,
        "retrieval_tokens": args.retrieval_tokens,
        "ppl_tokens": args.ppl_tokens,
        "continuation": args.continuation,
        "max_model_len": max(args.retrieval_tokens + args.ppl_tokens) + args.continuation + 512,
        "kv_cache_gib": 4,
        "parts": sorted(parts & {"retrieval", "perplexity"}),
    }
    if q_spec["parts"]:
        print(f"quality: {len(settings)} settings x {' and '.join(q_spec['parts'])} ...", flush=True)
        quality_now = _run_worker("quality", q_spec, False, log)
        result["quality"] = {**result.get("quality", {}), **{k: v for k, v in quality_now.items() if v}}
    if args.reference and "perplexity" in parts:
        print("transformers reference perplexity at keep 0.25 ...", flush=True)
        result["reference"] = _reference_ppl(model, q_spec, args.reference)
    if "speed" in parts:
        result["speed"] = _speed(args, model, log)
    previous = result.get("args", {})
    result["args"] = {**previous, **{k: v for k, v in vars(args).items() if k not in ("func", "parts")}}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_report(result, model, out)
    print(f"wrote {out}")
    return 0


def _speed(args, model: str, log: Path) -> dict:
    per_request = math.ceil((args.prompt_tokens + args.output_tokens) / BLOCK)
    s_spec = {
        "model": model,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "max_num_seqs": args.requests,
        "blocks": per_request * args.stock_fits + 1,
    }
    speed_settings = (
        [{"policy": "full", "keep": 1.0}]
        + [{"policy": args.policies[0], "keep": k} for k in args.keep]
        + [{"policy": p, "keep": 0.25} for p in args.policies[1:]]
    )
    print(
        f"speed: {args.requests} x {args.prompt_tokens}+{args.output_tokens} tokens, KV pool "
        f"{s_spec['blocks']} "
        f"blocks: stock, flopwise ({len(speed_settings)} settings), stock ...",
        flush=True,
    )
    stock_setting = {**s_spec, "settings": [{"policy": "stock", "keep": 1.0}]}
    stock = _run_worker("speed", stock_setting, True, log)["rows"]
    rows = _run_worker("speed", {**s_spec, "settings": speed_settings}, False, log)["rows"]
    stock += _run_worker("speed", stock_setting, True, log)["rows"]
    return {"spec": s_spec, "stock": stock, "rows": rows}


def rewrite_report(out: Path = Path("bench/results/kv.md")) -> None:
    """Rewrite the markdown and plot from the committed JSON (after a change to the report's text)."""
    from flopwise.models import default_model_path

    write_report(json.loads(out.with_suffix(".json").read_text()), default_model_path(), out)


def _blocks_per_request(row: dict) -> float:
    held = [
        math.ceil((p + o) / BLOCK) - d / BLOCK
        for p, o, d in zip(
            row["prompt_tokens"],
            row["output_tokens"],
            row.get("dropped_tokens", [0] * len(row["prompt_tokens"])),
        )
    ]
    return sum(held) / len(held)


def _decode_attention(ledger: FlopModel, row: dict) -> int:
    return sum(
        ledger.request(p, o, kv_dropped=d).decode.flops.get("attention", 0)
        for p, o, d in zip(row["prompt_tokens"], row["output_tokens"], row["dropped_tokens"])
    )


def write_report(result: dict, model: str, out: Path) -> None:
    from flopwise_bench.common import versions

    args, quality, sp = result["args"], result["quality"], result["speed"]
    ledger = FlopModel.from_pretrained(model)
    stock_wall = min(r["wall_s"] for r in sp["stock"])
    stock_walls = " / ".join(f"{r['wall_s']:.1f}" for r in sp["stock"])
    stock = sp["stock"][0]
    full_attn = _decode_attention(ledger, sp["rows"][0])
    lines = [
        "# KV token dropping vs stock vLLM",
        "",
        f"Hardware: {hw.describe()}. {versions()}. Model: SmolLM2-135M-Instruct ({hw.default_dtype()}), "
        f"block size {BLOCK}, prefix caching off (a dropping request computes its own prompt). "
        "Made by `flopwise bench kv` (`make bench-kv`); raw numbers in kv.json.",
        "",
        "## Speed and memory",
        "",
        f"{args['requests']} requests of {args['prompt_tokens']} prompt + {args['output_tokens']} generated "
        "tokens "
        f"(docstring prose), all submitted at once, greedy; the KV pool is capped at {sp['spec']['blocks']} "
        "blocks "
        f"so stock vLLM holds about {args['stock_fits']} requests at a time. Stock vLLM ran before and after "
        f"flopwise: {stock_walls} s (the faster is the reference). "
        "Peaks are vLLM's own gauges (`num_requests_running`, `kv_cache_usage_perc`) read after every step. "
        "Decode attention FLOPs: the ledger on the context each request kept (what the scheduler charges).",
        "",
        "| setting | prompt KV kept | decode attention FLOPs | cut | KV blocks per request | cut | "
        "peak requests running | peak blocks per running request | wall s | speed-up vs stock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_blocks = _blocks_per_request(stock)
    for r in [stock, *sp["rows"]]:
        attn = _decode_attention(ledger, r) if r is not stock else full_attn
        kept = 1 - sum(r.get("dropped_tokens", [0])) / sum(r["prompt_tokens"])
        blocks = _blocks_per_request(r)
        wall = stock_wall if r is stock else r["wall_s"]
        name = {"stock": "stock vLLM", "full": "flopwise, no drop"}.get(
            r["policy"], f"{r['policy']} {r['keep']}"
        )
        lines.append(
            f"| {name} | {kept:.2f} | {attn / 1e9:.1f} G | {full_attn / attn:.2f}x | {blocks:.1f} | "
            f"{base_blocks / blocks:.2f}x | {r['peak_running']:.0f} | "
            f"{r['peak_blocks'] / max(r['peak_running'], 1):.1f} | {wall:.1f} | {stock_wall / wall:.2f}x |"
        )
    lines += [
        "",
        "KV blocks per request: what a request holds at its end (prompt + generated tokens, less the "
        "blocks its drop freed). Peak blocks per running request: vLLM's peak KV usage over its peak number "
        "of running requests (the pool is full in most runs: freed blocks go to more requests). Wall time: "
        "dropping leaves the prefill (the same prompt tokens, plus the policy's scoring) as it is, and here "
        "the "
        "prefill is about half of stock vLLM's time, so the wall-time cut trails the FLOP cut; h2o's scoring "
        "recomputes each layer's full prompt attention in float32 and costs more than the drop saves.",
    ]
    lines += _targets(result, ledger, full_attn, base_blocks)
    lines += ["", "## Quality", ""]
    tokens_r, tokens_p = args["retrieval_tokens"], args["ppl_tokens"]
    header = ["policy", "keep"] + [f"retrieval @{t}" for t in tokens_r] + [f"ppl @{t}" for t in tokens_p]
    lines += [
        f'Retrieval: {args["questions"]} prompts per length, one "The secret code for item N is M." line '
        "hidden in "
        "docstring prose, asked back at the end (the question is part of the prompt that is dropped from, "
        "as a "
        "server sees it); exact code = right. Perplexity: of the next "
        f"{args['continuation']} tokens of {args['docs']} prose documents, teacher-forced against the kept "
        "cache "
        "(vLLM log-probabilities of the forced tokens).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in _settings(args["policies"], args["keep"]):
        key = f"{s['policy']}@{s['keep']}"
        cells = [s["policy"], f"{s['keep']}"]
        cells += [f"{quality['retrieval'][f'{key}@{t}']['accuracy']:.2f}" for t in tokens_r]
        cells += [f"{quality['perplexity'][f'{key}@{t}']['ppl']:.2f}" for t in tokens_p]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("reference"):
        lines += [
            "",
            f"Transformers reference (float32, same kept positions), perplexity @{tokens_p[0]} at keep 0.25 "
            f"vs the engine ({hw.default_dtype()}):",
            "",
            "| policy | reference | vLLM |",
            "|---|---|---|",
        ]
        for key, v in result["reference"].items():
            policy, keep, t = key.split("@")
            lines.append(
                f"| {policy} | {v['ppl']:.2f} | {quality['perplexity'][f'{policy}@{keep}@{t}']['ppl']:.2f} |"
            )
    out.write_text("\n".join(lines) + "\n")
    _plot(result, ledger, out.with_suffix(".png"))


def _targets(result: dict, ledger: FlopModel, full_attn: int, base_blocks: float) -> list[str]:
    """The issue's targets at 25% kept, each stated as met or not, from the numbers above."""
    quality, sp, args = result["quality"], result["speed"], result["args"]
    at = [r for r in sp["rows"] if r["keep"] == 0.25]
    if not at:
        return []
    first = at[0]
    attn_cut = full_attn / _decode_attention(ledger, first)
    block_cut = base_blocks / _blocks_per_request(first)
    running = first["peak_running"] / sp["stock"][0]["peak_running"]
    out = [
        "",
        "## Targets at 25% kept",
        "",
        f"- Decode attention FLOPs ≥3x fewer: {attn_cut:.2f}x — {'met' if attn_cut >= 3 else 'not met'}.",
        f"- KV blocks ≥3x fewer: {block_cut:.2f}x per request — {'met' if block_cut >= 3 else 'not met'} "
        f"(whole 128-token blocks: keep 0.25 of a {args['prompt_tokens']}-token prompt holds "
        f"{1 - sum(first['dropped_tokens']) / sum(first['prompt_tokens']):.2f} of it); {running:.2f}x as "
        "many "
        "requests running at once in the same pool.",
    ]
    for n in args["ppl_tokens"]:
        full = quality["perplexity"][f"full@1.0@{n}"]["ppl"]
        best = min(args["policies"], key=lambda p: quality["perplexity"][f"{p}@0.25@{n}"]["ppl"])
        ratio = quality["perplexity"][f"{best}@0.25@{n}"]["ppl"] / full
        out.append(
            f"- Perplexity within 2% of full on the better policy, @{n}: {best} {ratio - 1:+.1%} — "
            f"{'met' if ratio <= 1.02 else 'not met'}."
        )
    for n in args["retrieval_tokens"]:
        full = quality["retrieval"][f"full@1.0@{n}"]["accuracy"]
        best = max(args["policies"], key=lambda p: quality["retrieval"][f"{p}@0.25@{n}"]["accuracy"])
        acc = quality["retrieval"][f"{best}@0.25@{n}"]["accuracy"]
        out.append(
            f"- Retrieval within 2% of full, @{n}: {best} {acc:.2f} vs {full:.2f} — "
            f"{'met' if acc >= 0.98 * full else 'not met'}."
        )
    return out


def _plot(result: dict, ledger: FlopModel, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args, quality = result["args"], result["quality"]
    t = args["retrieval_tokens"][0]
    p = args["ppl_tokens"][0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    keeps = [1.0, *args["keep"]]
    for policy in args["policies"]:

        def get(table, field, keep, n, policy=policy):
            return quality[table][f"{'full' if keep == 1.0 else policy}@{keep}@{n}"][field]

        a.plot(keeps, [get("retrieval", "accuracy", k, t) for k in keeps], marker="o", label=policy)
        b.plot(keeps, [get("perplexity", "ppl", k, p) for k in keeps], marker="o", label=policy)
    a.set(xlabel="fraction of prompt KV kept", ylabel=f"retrieval accuracy @{t} tokens", xscale="log")
    b.set(
        xlabel="fraction of prompt KV kept",
        ylabel=f"perplexity @{p} tokens (log)",
        xscale="log",
        yscale="log",
    )
    a.legend(fontsize=8)
    fig.suptitle(f"KV dropping in vLLM, SmolLM2-135M ({hw.describe()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":  # a worker: python -m flopwise_bench.kv_drop SPEC_JSON
    spec = json.loads(sys.argv[1])
    from flopwise_serve.offline import set_engine_env

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.get("kv_cache_gib", 1))
    set_engine_env()
    data = quality(spec) if spec["kind"] == "quality" else speed(spec)
    Path(spec["result"]).write_text(json.dumps(data))
