"""``flopwise bench overhead`` and ``budget``: measurements against stock vLLM, in one run, under
bench/results/.

``overhead``: stock vLLM's OpenAI server vs ``flopwise serve`` (ledger-charging scheduler, usage taps,
every technique off) on the same model and prompts. Both servers stay up; workload rounds alternate
between them so that drift on a shared machine hits both alike. Throughput = output tokens / wall time
of a round with every request in flight at once.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import statistics
import time
from pathlib import Path

from flopwise import hw
from flopwise.models import cache_dir, resolve_model
from flopwise_bench.common import corpus_text, versions


async def _round(
    base_url: str, model: str, prompts: list[str], max_tokens: int, extra: dict | None = None
) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600, max_retries=0)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            client.completions.create(
                model=model,
                prompt=p,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True, **(extra or {})},
            )
            for p in prompts
        )
    )
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


def workload(args, r: int) -> list[str]:
    """Round ``r``'s prompts. A per-round tag in the first block keeps rounds from hitting each other's
    prefix cache; both servers get identical prompts within a round."""
    return [
        f"[round {r} request {i}]\n" + corpus_text(args.prompt_tokens * 4, r * 1000 + i)
        for i in range(args.requests)
    ]


def alternate_rounds(args, model: str, stock, flop, flop_extra: dict | None = None) -> list[dict]:
    """Warm both servers up with one full round, then alternate measured rounds between them."""
    for server in (stock, flop):
        asyncio.run(_round(server.url, model, workload(args, -1), args.output_tokens))
    rows = []
    for r in range(args.rounds):
        order = (
            [("stock", stock), ("flopwise", flop)] if r % 2 == 0 else [("flopwise", flop), ("stock", stock)]
        )
        res = {}
        for name, server in order:
            time.sleep(2)  # let the other server's OpenMP threads stop spinning before timing
            extra = flop_extra if name == "flopwise" else None
            res[name] = asyncio.run(_round(server.url, model, workload(args, r), args.output_tokens, extra))
            print(
                f"  round {r + 1} {name:>8}: {res[name]['tok_s']:7.1f} output tok/s "
                f"({res[name]['wall']:.1f}s)"
            )
        rows.append(res)
    return rows


def bench_overhead(args) -> int:
    from flopwise_serve.launch import flopwise_server, free_port, stock_server

    model = resolve_model(args.model)
    logs = cache_dir() / "logs"
    engine_args = ["--max-model-len", "2048", "--max-num-seqs", str(max(args.requests, 8))]
    print(
        f"bench overhead: {model}\n  {hw.describe()}; {args.requests} requests x ~{args.prompt_tokens} prompt"
        f" / {args.output_tokens} output tokens, {args.rounds} rounds per server"
    )
    stock = stock_server(model, free_port(), logs / "bench-stock.log", engine_args)
    flop = flopwise_server(model, free_port(), logs / "bench-flopwise.log", engine_args)
    try:
        stock.start()
        flop.start()
        rows = alternate_rounds(args, model, stock, flop)
    finally:
        flop.stop()
        stock.stop()

    ratios = [row["flopwise"]["tok_s"] / row["stock"]["tok_s"] for row in rows]
    ratio = statistics.median(ratios)
    flops_per_round = rows[0]["flopwise"]["flops"]
    write_overhead_report(args, model, rows, ratios, ratio, flops_per_round)
    print(f"  median throughput ratio flopwise/stock = {ratio:.3f} (target >= 0.98); report: {args.out}")
    return 0


def write_overhead_report(args, model, rows, ratios, ratio, flops_per_round) -> None:
    r0 = rows[0]["stock"]
    lines = [
        "# Overhead: stock vLLM vs vLLM with flopwise (every technique off)",
        "",
        f"Measured {datetime.date.today().isoformat()} by `flopwise bench overhead` "
        f"(`--requests {args.requests} --prompt-tokens {args.prompt_tokens} --output-tokens "
        f"{args.output_tokens} --rounds {args.rounds}`).",
        "",
        f"- Hardware: {hw.describe()}",
        f"- Software: {versions()}",
        f"- Model: `{Path(model).name}` (embedded default), `--enforce-eager`, KV cache "
        f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1')} GiB",
        f"- Workload per round: {args.requests} completions in flight at once, {r0['prompt_tokens']} prompt "
        "tokens and "
        f"{r0['output_tokens']} output tokens in all (greedy, `ignore_eos`); prompts differ per round so no "
        "round hits another's prefix cache.",
        "- Both OpenAI servers run side by side; rounds alternate which server goes first.",
        '- Stock = vLLM\'s own server with `VLLM_PLUGINS=""` (no plugin loads). flopwise = `flopwise '
        "serve`: ledger-charging",
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
        lines.append(
            f"The ledger charged {flops_per_round / 1e12:.3f} TFLOP per round, i.e. {gflops:.1f} GFLOP/s "
            "achieved by the engine in round 1."
        )
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


# -- flopwise bench budget ----------------------------------------------------------------------------
async def _overshoot_probe(url: str, model: str, ledger, n: int, seed: int = 0) -> dict:
    """Requests with random budgets from 0.3x to 1.5x of their full cost: every answered one must stay
    within."""
    import random

    import httpx

    rng = random.Random(seed)
    stats = {
        "requests": n,
        "refused": 0,
        "capped": 0,
        "full": 0,
        "over": 0,
        "max_overshoot": 0,
        "charged": 0,
        "budget": 0,
    }

    async def one(http, i):
        prompt = f"[probe {i}] " + corpus_text(rng.randint(20, 400) * 4, 5000 + i)
        budget = ledger.request(len(prompt) // 4, 64).total * rng.uniform(0.3, 1.5)
        r = await http.post(
            "/v1/completions",
            json={
                "model": model,
                "prompt": prompt,
                "max_tokens": 64,
                "temperature": 0,
                "ignore_eos": True,
                "flop_budget": budget,
            },
        )
        if r.status_code == 400:
            stats["refused"] += 1
            return
        r.raise_for_status()
        body = r.json()
        charged = body["usage"]["flops"]["total"]
        stats["charged"] += charged
        stats["budget"] += budget
        stats["capped" if body["choices"][0].get("stop_reason") == "flop_budget" else "full"] += 1
        if charged > budget:
            stats["over"] += 1
            stats["max_overshoot"] = max(stats["max_overshoot"], charged - budget)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(one(http, i) for i in range(n)))
    return stats


async def _mixed_latency(url: str, model: str, ledger, huge: int, small: int) -> dict:
    """``huge`` long requests with effectively unlimited budgets, then ``small`` short ones with small
    budgets."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", timeout=900, max_retries=0)

    async def timed(prompt, max_tokens, budget, delay):
        await asyncio.sleep(delay)
        t = time.perf_counter()
        await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True, "flop_budget": budget},
        )
        return time.perf_counter() - t

    small_budget = 3 * ledger.request(40, 16).total
    jobs = [timed(f"[huge {i}] " + corpus_text(4000, 9000 + i), 160, 1e15, 0) for i in range(huge)]
    jobs += [timed(f"[small {i}] " + corpus_text(120, 7000 + i), 16, small_budget, 0.3) for i in range(small)]
    latencies = await asyncio.gather(*jobs)
    await client.close()
    small_lat = sorted(latencies[huge:])
    return {
        "small_p50": statistics.median(small_lat),
        "small_p95": small_lat[int(0.95 * (len(small_lat) - 1))],
        "huge_mean": statistics.mean(latencies[:huge]),
    }


def bench_budget(args) -> int:
    from flopwise.ledger import FlopModel
    from flopwise_serve.launch import flopwise_server, free_port, stock_server

    model = resolve_model(args.model)
    ledger = FlopModel.from_pretrained(model)
    logs = cache_dir() / "logs"
    engine_args = ["--max-model-len", "2048", "--max-num-seqs", str(max(args.requests, 8))]
    print(f"bench budget: {model}\n  {hw.describe()}")
    # Generous budgets: enforced on every step, but large enough that no request is cut short.
    generous = 2 * ledger.request(2 * args.prompt_tokens, args.output_tokens).total
    stock = stock_server(model, free_port(), logs / "bench-stock.log", engine_args)
    flop = flopwise_server(model, free_port(), logs / "bench-flopwise.log", engine_args)
    try:
        stock.start()
        flop.start()
        rows = alternate_rounds(args, model, stock, flop, flop_extra={"flop_budget": generous})
        stock.stop()
        probe = asyncio.run(_overshoot_probe(flop.url, model, ledger, args.probe_requests))
        print(f"  overshoot probe: {probe}")
    finally:
        flop.stop()
        stock.stop()

    latency: dict[str, list[dict]] = {"fifo": [], "smallest-budget": []}
    small_seqs = ["--max-num-seqs", "4", "--max-model-len", "2048"]
    servers = {
        p: flopwise_server(
            model, free_port(), logs / f"bench-policy-{p}.log", small_seqs + ["--budget-policy", p]
        )
        for p in latency
    }
    try:
        for server in servers.values():
            server.start()
        for rep in range(args.latency_reps):
            for policy in list(latency) if rep % 2 == 0 else list(latency)[::-1]:
                time.sleep(2)
                res = asyncio.run(_mixed_latency(servers[policy].url, model, ledger, args.huge, args.small))
                latency[policy].append(res)
                print(
                    f"  {policy:>15}: small p50 {res['small_p50']:.2f}s p95 {res['small_p95']:.2f}s, huge "
                    f"mean {res['huge_mean']:.2f}s"
                )
    finally:
        for server in servers.values():
            server.stop()

    write_budget_report(args, model, rows, generous, probe, latency)
    ratio = statistics.median(r["flopwise"]["tok_s"] / r["stock"]["tok_s"] for r in rows)
    print(f"  throughput ratio with budgets on = {ratio:.3f} (target >= 0.97); report: {args.out}")
    return 0


def write_budget_report(args, model, rows, generous, probe, latency) -> None:
    ratios = [r["flopwise"]["tok_s"] / r["stock"]["tok_s"] for r in rows]
    same_tokens = all(r["flopwise"]["output_tokens"] == r["stock"]["output_tokens"] for r in rows)

    def med(policy, key):
        return statistics.median(x[key] for x in latency[policy])

    lines = [
        "# FLOP budgets: throughput, overshoot, and small-request latency under mixed load",
        "",
        f"Measured {datetime.date.today().isoformat()} by `flopwise bench budget`.",
        "",
        f"- Hardware: {hw.describe()}",
        f"- Software: {versions()}",
        f"- Model: `{Path(model).name}` (embedded default), `--enforce-eager`",
        "",
        "## Throughput with budgets on vs stock vLLM",
        "",
        f"{args.requests} completions in flight per round, ~{args.prompt_tokens} prompt / "
        f"{args.output_tokens} output tokens, greedy.",
        f"Every flopwise request carries `flop_budget` = {generous:.4g} FLOPs, checked before every step "
        "but large enough",
        f"that no request is cut short (same output tokens as stock: {'yes' if same_tokens else 'NO'}). "
        "Servers side by side,",
        "rounds alternate which goes first.",
        "",
        "| round | stock output tok/s | flopwise + budgets output tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for i, (row, q) in enumerate(zip(rows, ratios), 1):
        lines.append(f"| {i} | {row['stock']['tok_s']:.1f} | {row['flopwise']['tok_s']:.1f} | {q:.3f} |")
    lines += [
        "",
        f"**Median throughput ratio: {statistics.median(ratios):.3f}** (target ≥ 0.97).",
        "",
        "## Budget overshoot",
        "",
        f"{probe['requests']} concurrent requests, prompts of 20–400 tokens, `max_tokens` 64, budgets drawn "
        "from 0.3× to 1.5× of",
        "each request's full cost.",
        "",
        "| refused at admission | stopped by budget | completed in full | answered over budget | max "
        "overshoot (FLOPs) |",
        "|---|---|---|---|---|",
        f"| {probe['refused']} | {probe['capped']} | {probe['full']} | {probe['over']} | "
        f"{probe['max_overshoot']:.0f} |",
        "",
        f"**Overshoot: {probe['over']} requests, {probe['max_overshoot']:.0f} FLOPs at most** (target 0). "
        "Answered requests used "
        f"{probe['charged'] / max(probe['budget'], 1):.1%} of their budgets in all.",
        "",
        "## Small-request latency: smallest-budget-first vs FIFO",
        "",
        f"`--max-num-seqs 4`; {args.huge} long requests (~1000 prompt tokens, 160 output, unlimited budget) "
        "are sent first,",
        f"then {args.small} short ones (~30 prompt tokens, 16 output, small budgets) 0.3 s later. Medians "
        f"over {args.latency_reps} runs per policy,",
        "both servers side by side, runs alternating.",
        "",
        "| policy | small p50 (s) | small p95 (s) | long requests, mean latency (s) |",
        "|---|---|---|---|",
    ]
    for policy in latency:
        lines.append(
            f"| {policy} | {med(policy, 'small_p50'):.2f} | {med(policy, 'small_p95'):.2f} | "
            f"{med(policy, 'huge_mean'):.2f} |"
        )
    lines += [
        "",
        "`smallest-budget` sets each request's vLLM priority from its budget and runs vLLM's priority "
        "scheduler, so short",
        "requests are admitted ahead of long ones waiting in the queue; FIFO is vLLM's default order.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
