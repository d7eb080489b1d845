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

    parser = sub.add_parser("demo", help="start the server on the default model, send chat requests, print FLOPs, stop")
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
            r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
            rows.append((prompt, r.usage, r.choices[0].message.content or ""))
        header = f"{'prompt':<48} {'in':>4} {'out':>4} {'prefill':>13} {'decode':>13} {'total FLOPs':>13}  answer"
        print(header)
        print("-" * len(header))
        total = 0
        for prompt, u, answer in rows:
            f = u.flops
            total += f["total"]
            print(f"{_short(prompt, 48):<48} {u.prompt_tokens:>4} {u.completion_tokens:>4} "
                  f"{human(f['prompt']):>13} {human(f['completion']):>13} {human(f['total']):>13}  {_short(answer, 40)}")
        print("-" * len(header))
        print(f"{'all requests':<58} {'':>13} {'':>13} {human(total):>13}")
        print("\nusage.flops comes from the engine's scheduler, charged step by step from the FLOP ledger;")
        print("the same totals are Prometheus counters on /metrics (flopwise_flops_total).")
    finally:
        server.stop()
    print(f"server stopped; demo took {time.monotonic() - t0:.0f}s")
    return 0


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
