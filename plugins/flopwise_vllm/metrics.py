"""Prometheus counters for the FLOP ledger, served on vLLM's own ``/metrics``.

They live in the API-server process, in the default registry that vLLM's ``/metrics`` exposes, and
are fed from the same per-request charges that ``usage.flops`` reports.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter

_lock = threading.Lock()
_metrics: dict[str, Counter] | None = None
_engine_seen: dict[int, int] = {}  # data-parallel rank -> the engine's running total already counted


def _get() -> dict[str, Counter]:
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = {
                "flops": Counter(
                    "flopwise_flops", "FLOPs charged to finished requests by the flopwise ledger.", ["part"]
                ),
                "baseline": Counter(
                    "flopwise_dense_baseline_flops",
                    "FLOPs the same requests would cost with no flopwise technique on.",
                ),
                "saved": Counter(
                    "flopwise_flops_saved", "Dense baseline minus charged FLOPs of finished requests."
                ),
                "requests": Counter(
                    "flopwise_requests", "Requests whose FLOPs were charged by the flopwise ledger."
                ),
                "engine": Counter(
                    "flopwise_engine_flops",
                    "All FLOPs the engine computed, aborted requests included (updated as requests finish).",
                ),
                "capped": Counter(
                    "flopwise_requests_capped", "Requests stopped mid-generation by their FLOP budget."
                ),
                "refused": Counter(
                    "flopwise_requests_refused",
                    "Requests refused at admission: bad flop_budget or a prefill that cannot fit.",
                ),
                "kv_dropped": Counter(
                    "flopwise_kv_dropped_tokens",
                    "Prompt tokens whose KV was dropped after prefill (KV dropping).",
                ),
            }
        return _metrics


def refused() -> None:
    _get()["refused"].inc()


def observe(usage: dict[str, int], engine_totals: dict[int, int], capped: bool = False) -> None:
    """Count one finished HTTP request's ``usage.flops`` and the running totals of the engines it ran on
    (one per data-parallel rank: ``flopwise_engine_flops`` adds up what every engine computed)."""
    m = _get()
    if capped:
        m["capped"].inc()
    m["flops"].labels(part="prompt").inc(usage["prompt"])
    m["flops"].labels(part="completion").inc(usage["completion"])
    m["baseline"].inc(usage["dense_baseline"])
    m["saved"].inc(max(0, usage["dense_baseline"] - usage["total"]))
    m["requests"].inc()
    if "kv" in usage:
        m["kv_dropped"].inc(usage["kv"]["dropped_tokens"])
    with _lock:
        delta = 0
        for engine, total in engine_totals.items():
            seen = _engine_seen.get(engine, 0)
            delta += max(0, total - seen)
            _engine_seen[engine] = max(seen, total)
    m["engine"].inc(delta)
