"""``flopwise demo`` (= ``make demo``): serve the embedded default model, send chat requests with the
official ``openai`` client, print what each cost in FLOPs, stop the server."""

from __future__ import annotations

import sys
import time

from flopwise import hw
from flopwise.models import cache_dir, default_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
]


def add_parser(sub) -> None:
    from flopwise_serve.common import positive_int

    parser = sub.add_parser(
        "demo", help="start the server on the default model, send chat requests, print FLOPs, stop"
    )
    parser.add_argument("--port", type=positive_int, default=8765)
    parser.add_argument("--max-tokens", type=positive_int, default=48)
    parser.set_defaults(run=lambda args, rest: run_demo(port=args.port, max_tokens=args.max_tokens))


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def run_demo(port: int = 8765, max_tokens: int = 48) -> int:
    from openai import OpenAI

    from flopwise_serve.common import human
    from flopwise_serve.launch import flopwise_server, free_port

    model = default_model_path()
    log = cache_dir() / "logs" / "demo-server.log"
    print(f"flopwise demo: serving {model}\n  on {hw.describe()}; server log: {log}")
    t0 = time.monotonic()
    try:
        server = flopwise_server(model, port if _port_free(port) else free_port(), log).start()
    except (RuntimeError, TimeoutError) as e:
        print(f"flopwise demo: error: the server did not start: {e}", file=sys.stderr)
        return 1
    try:
        print(f"  server healthy at {server.url} after {time.monotonic() - t0:.0f}s\n")
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120, max_retries=0)
        model_id = client.models.list().data[0].id
        rows = []
        for prompt in PROMPTS:
            r = client.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
            )
            rows.append((prompt, r.usage, r.choices[0].message.content or ""))
        header = (
            f"{'prompt':<48} {'in':>4} {'out':>4} {'prefill':>13} {'decode':>13} {'total FLOPs':>13}  answer"
        )
        print(header)
        print("-" * len(header))
        total = 0
        for prompt, u, answer in rows:
            f = u.flops
            total += f["total"]
            print(
                f"{_short(prompt, 48):<48} {u.prompt_tokens:>4} {u.completion_tokens:>4} "
                f"{human(f['prompt']):>13} {human(f['completion']):>13} {human(f['total']):>13}  "
                f"{_short(answer, 40)}"
            )
        print("-" * len(header))
        print(f"{'all requests':<58} {'':>13} {'':>13} {human(total):>13}")
        print("\nusage.flops comes from the engine's scheduler, charged step by step from the FLOP ledger;")
        print("the same totals are Prometheus counters on /metrics (flopwise_flops_total).\n")
        _savings(client, model_id, model)
    finally:
        server.stop()
    print(f"server stopped; demo took {time.monotonic() - t0:.0f}s")
    return 0


def _savings(client, model_id: str, model: str) -> None:
    """The mechanisms on the same server, each next to what the same request costs without it."""
    from flopwise import longctx
    from flopwise.ledger import FlopModel
    from flopwise_serve.common import human

    ledger = FlopModel.from_pretrained(model)
    rows = []
    chat = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    # 1. A flop_budget: the request stops when its next step could cross it.
    r = client.chat.completions.create(
        model=model_id,
        messages=chat,
        max_tokens=256,
        temperature=0,
        extra_body={"ignore_eos": True, "flop_budget": 4e10},
    )
    uncapped = ledger.request(r.usage.prompt_tokens, 256).total
    rows.append(
        (
            "flop_budget 4e10 (max_tokens 256)",
            r.usage.flops["total"],
            uncapped,
            f"stopped after {r.usage.completion_tokens} tokens: "
            f"{r.choices[0].model_extra.get('stop_reason')}",
        )
    )
    # 2. Early rejection of n=8 candidates vs plain best-of-8, same prompt and seed.
    sum_prompt = [{"role": "user", "content": "Compute 17 + 25 + 38 step by step, one addition per line."}]
    common = dict(model=model_id, messages=sum_prompt, n=8, max_tokens=64, temperature=0.8, seed=0)
    plain = client.chat.completions.create(**common)
    er = client.chat.completions.create(
        **common,
        extra_body={"early_rejection": {"prm": "verifier:arithmetic", "every_tokens": 16, "keep": 0.25}},
    )
    stats = er.model_extra["early_rejection"]
    rows.append(
        (
            "early_rejection n=8 vs best-of-8",
            er.usage.flops["total"],
            plain.usage.flops["total"],
            f"{stats['rejected']} of {stats['started']} rejected, {stats['tokens_saved']} tokens saved",
        )
    )
    # 3. KV dropping on a long prompt: decode attends to the kept quarter of it (what it cuts: decode
    # attention;
    # the prefill, which dominates this request, is computed in full).
    doc = "\n\n".join(longctx.paragraphs()[:12])
    long = [{"role": "user", "content": doc + "\n\nSummarise the text above in one sentence."}]
    r = client.chat.completions.create(
        model=model_id,
        messages=long,
        max_tokens=128,
        temperature=0,
        extra_body={"ignore_eos": True, "kv_policy": "snapkv", "kv_keep": 0.25},
    )
    f = r.usage.flops
    full_attention = f["attention"] + f["dense_baseline"] - f["total"] + f["kv_scoring"]
    rows.append(
        (
            f"kv_keep 0.25, {r.usage.prompt_tokens}-tok prompt: attn",
            f["attention"],
            full_attention,
            f"attention of prefill + 128 decode steps; KV of {f['kv']['kept_tokens']} of "
            f"{f['kv']['prompt_tokens']} prompt tokens kept; request total "
            f"{human(f['total'])} vs {human(f['dense_baseline'])}",
        )
    )
    header = f"{'what flopwise did':<38} {'charged':>13} {'without it':>13} {'cut':>6}  how"
    print(header)
    print("-" * len(header))
    for what, charged, without, how in rows:
        print(f"{what:<38} {human(charged):>13} {human(without):>13} {without / charged:>5.2f}x  {how}")
    print("-" * len(header))
    print(
        "'without it': the same request with no budget (ledger), plain best-of-8 (measured), the full cache"
    )
    print("(from usage.flops.dense_baseline).")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
