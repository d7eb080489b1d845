"""``flopwise bench early-rejection``: best-of-N vs early rejection, one engine, one run, same problems.

Generator: SmolLM2-135M-Instruct fine-tuned on long chain sums by ``bench/scripts/finetune_chain_sum.py``
(12-15 one-digit terms, about 120-token step-per-line answers). Every setting runs the same held-out
reasoning-gym problems, all at once, through the flopwise scheduler; each problem has its own seed
(candidate i of problem p samples with seed ``100 p + i``), so every setting sees the same candidates
until it rejects some, and a rerun repeats. The best-of-N baselines run with ``keep=1`` and the
``self:chain-sum`` head, so their candidates carry its score (for its AUROC: a dot product per token, 2 *
576 FLOPs next to the ~0.27 GFLOP of the token's forward pass) and nothing is rejected; their FLOPs are
shown without it. Answers are chosen among the candidates that finished (not rejected) by the exact
verifier (free here) and, separately, by majority vote. Stock vLLM (its own scheduler) runs best-of-8 on
the same problems and seeds for the wall-time reference. FLOPs are the ledger's: prefill, decode, scoring.
Accuracies carry a 95% bootstrap interval over problems; differences to best-of-8 a paired one. The
``accept wK`` settings run a problem's candidates K at a time and end it at the first answer the verifier
accepts: the answer chosen is then that one, where best-of-N picks the lowest-index accepted one.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from flopwise import hw
from flopwise.prm import load_prm
from flopwise.reasoning import chain_sum, extract_answer, generator_dir
from flopwise.techniques.early_rejection import EarlyRejectionConfig, survivors
from flopwise_bench.stats import bootstrap_ci

KV_CACHE_GIB = 4
PROBLEM_SEED = 7  # the fine-tune trains on seed 1000, train-prm on 2000
TEMPERATURE = 0.8
VERIFIER = "verifier:arithmetic"
SELF = "self:chain-sum"  # flopwise train-prm --self on the generator's own traces
HEAD = "head:chain-sum"  # flopwise train-prm: a second model (SmolLM2) reads the text at each checkpoint

_ACCEPT = dict(prm=VERIFIER, every_steps=1, every_tokens=48, threshold=0.5, accept=1.0)
# name -> (n, early_rejection fields); checkpoints every 2 lines (capped at 48 tokens) or every 32 tokens
SETTINGS = {
    "verifier thr0.5 n=8 /1 step": (8, dict(prm=VERIFIER, every_steps=1, every_tokens=48, threshold=0.5)),
    "verifier thr0.5 n=4 /1 step": (4, dict(prm=VERIFIER, every_steps=1, every_tokens=48, threshold=0.5)),
    "verifier thr0.5 keep0.5 n=8 /2 steps": (
        8,
        dict(prm=VERIFIER, every_steps=2, every_tokens=48, threshold=0.5, keep=0.5),
    ),
    "verifier thr0.5 keep0.25 n=16 /2 steps": (
        16,
        dict(prm=VERIFIER, every_steps=2, every_tokens=48, threshold=0.5, keep=0.25, min_keep=2),
    ),
    "confidence pct50 n=8 /32 tok": (8, dict(prm="confidence", every_tokens=32, percentile=50, min_keep=2)),
    "confidence keep0.5 n=8 /32 tok": (8, dict(prm="confidence", every_tokens=32, keep=0.5)),
    "confidence pct90 n=16 /32 tok": (16, dict(prm="confidence", every_tokens=32, percentile=90, min_keep=2)),
    "confidence:tail margin0.02 n=8 /32 tok": (
        8,
        dict(prm="confidence:tail", every_tokens=32, margin=0.02, min_keep=2),
    ),
    "verifier thr0.5 keep0.5 min2 n=8 /2 steps": (
        8,
        dict(prm=VERIFIER, every_steps=2, every_tokens=48, threshold=0.5, keep=0.5, min_keep=2),
    ),
    # self:chain-sum rules from bench/scripts/calibrate_threshold.py on train-prm's problems (seed 2000)
    "self thr0.05 n=8 /1 step": (8, dict(prm=SELF, every_steps=1, every_tokens=48, threshold=0.05)),
    "self thr0.1 min2 n=8 /1 step": (
        8,
        dict(prm=SELF, every_steps=1, every_tokens=48, threshold=0.1, min_keep=2),
    ),
    "self margin0.3 n=8 /1 step": (8, dict(prm=SELF, every_steps=1, every_tokens=48, margin=0.3)),
    # the external PRM: what its passes cost in FLOPs and in engine stall (it runs inside schedule())
    "head margin0.3 n=8 /1 step": (8, dict(prm=HEAD, every_steps=1, every_tokens=48, margin=0.3)),
    # sequential best-of-N: `width` candidates at a time, each stopped at its first wrong line, and the
    # request ends at the first answer the verifier accepts (every line right)
    "verifier thr0.5 accept w2 n=8 /1 step": (8, dict(_ACCEPT, width=2)),
    "verifier thr0.5 accept w4 n=8 /1 step": (8, dict(_ACCEPT, width=4)),
    "verifier thr0.5 accept w8 n=8 /1 step": (8, dict(_ACCEPT, width=8)),
    "verifier thr0.5 accept w2 n=16 /1 step": (16, dict(_ACCEPT, width=2)),
    "verifier thr0.5 accept w4 n=16 /1 step": (16, dict(_ACCEPT, width=4)),
}
# what fits an hour on 2 cores beside the baselines
DEFAULT_SETTINGS = [
    "verifier thr0.5 n=8 /1 step",
    "verifier thr0.5 accept w2 n=8 /1 step",
    "verifier thr0.5 accept w4 n=8 /1 step",
    "verifier thr0.5 accept w2 n=16 /1 step",
    "confidence pct50 n=8 /32 tok",
    "self margin0.3 n=8 /1 step",
]


def _seeded(n: int, max_tokens: int, count: int, config: EarlyRejectionConfig | None):
    from vllm import SamplingParams

    extra = {"early_rejection": config.model_dump_json()} if config else None
    return [
        SamplingParams(n=n, temperature=TEMPERATURE, max_tokens=max_tokens, seed=100 * p, extra_args=extra)
        for p in range(count)
    ]


def choose(problem, candidates) -> tuple[bool, bool]:
    """(verifier pick right, majority vote right) among finished ``(index, text)`` candidates."""
    if not candidates:
        return False, False
    verifier = load_prm(VERIFIER)
    scores = [verifier.score("", text, final=True)[0] for _, text in candidates]
    pick = candidates[survivors(scores, 1)[0]][1]
    answers = [a for a in (extract_answer(t) for _, t in candidates) if a is not None]
    vote = Counter(answers).most_common(1)[0][0] if answers else None  # ties: the first seen
    return extract_answer(pick) == problem.answer, vote == problem.answer


def run_setting(llm, prompts, problems, name: str, n: int, fields: dict, max_tokens: int) -> dict:
    from flopwise_serve.offline import flops_of

    config = EarlyRejectionConfig(**fields)
    t0 = time.perf_counter()
    outs = llm.engine.generate(prompts, _seeded(n, max_tokens, len(prompts), config), use_tqdm=False)
    wall = time.perf_counter() - t0
    row = {"name": name, "n": n, "config": fields, "wall_s": wall, "verifier": [], "majority": []}
    row.update(flops=0, scoring_flops=0, prm_s=0.0, tokens=0, rejected=0, cand_scores=[], cand_right=[])
    for problem, out in zip(problems, outs):
        payload = out.ec_transfer_params["flopwise"]
        stats = payload["early_rejection"]
        done = sorted((c.index, c.text) for c in out.outputs if c.stop_reason != "early_rejection")
        v, m = choose(problem, done)
        row["verifier"].append(int(v))
        row["majority"].append(int(m))
        row["flops"] += flops_of(out)["total"]
        row["scoring_flops"] += payload["prm"]
        row["prm_s"] += stats["prm_s"]  # a text PRM inside schedule(): the whole engine waited this long
        row["tokens"] += sum(len(c.token_ids) for c in out.outputs)
        row["rejected"] += stats["rejected"]
        if name.startswith("best-of"):
            row.setdefault("texts", []).append(done)
        if name == "best-of-8":
            row.setdefault("token_ids", []).append(
                [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)]
            )
        for index, text in done:
            if str(index) in stats["scores"]:
                row["cand_scores"].append(stats["scores"][str(index)])
                row["cand_right"].append(extract_answer(text) == problem.answer)
    return row


def run_stock(model: str, prompts, n: int, max_tokens: int, engine: dict) -> dict:
    """Stock vLLM (its own scheduler) best-of-n on the same seeds: wall time and its tokens."""
    import gc

    from vllm import LLM

    from flopwise_serve.offline import set_engine_env

    set_engine_env()  # the small KV cache and core settings flopwise's LLM uses
    llm = LLM(
        model,
        dtype=hw.default_dtype(),
        enforce_eager=True,
        scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler",
        **engine,
    )
    # warm-up, as flopwise's
    llm.generate(prompts[:8], _seeded(8, 32, len(prompts[:8]), None), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, _seeded(n, max_tokens, len(prompts), None), use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {"name": f"stock vLLM best-of-{n}", "n": n, "wall_s": wall, "tokens": tokens}


def derived(row: dict, problems, n: int) -> dict:
    """Best-of-``n`` read off a measured best-of-N row's first ``n`` candidates (the same seeds give the
    same candidates): accuracy exact, FLOPs and wall not measured."""
    out = {"name": f"best-of-{n} (derived)", "n": n, "config": row["config"], "verifier": [], "majority": []}
    for problem, cands in zip(problems, row["texts"]):
        v, m = choose(problem, [(i, t) for i, t in cands if i < n])
        out["verifier"].append(int(v))
        out["majority"].append(int(m))
    out.update(flops=None, scoring_flops=0, wall_s=None, tokens=None, rejected=0)
    return out


def bench_early_rejection(args) -> int:
    from flopwise_bench.common import versions
    from flopwise_bench.early_rejection_report import rerender, write_report
    from flopwise_serve.offline import LLM

    if args.report_only:
        return rerender(args)
    model = args.model or str(generator_dir())
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(
            f"flopwise bench early-rejection: no generator at {model}; make it with "
            "`python bench/scripts/finetune_chain_sum.py` (about 20 minutes on 2 cores) or pass --model"
        )
    if args.settings is None:
        args.settings = DEFAULT_SETTINGS
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(
            f"flopwise bench early-rejection: unknown --settings {unknown}; known: {list(SETTINGS)}"
        )
    problems = chain_sum(args.problems, seed=PROBLEM_SEED)
    print(
        f"bench early-rejection: {model}\n  {hw.describe()}; {len(problems)} chain_sum problems", flush=True
    )
    prompts = _prompts(model, problems)
    # chunked prefill off: stock vLLM's CPU runner cannot rewind a seeded request's generator after a partial
    # prefill ("CPU Generator does not use offset"; flopwise's worker can: flopwise_vllm.seeded), and every
    # request here is seeded, the stock run's too
    engine = dict(max_model_len=512, block_size=args.block_size, seed=0, enable_chunked_prefill=False)
    # 1600 candidates at once: a 4 GiB KV cache keeps about 300 of them running (1 GiB: about 80)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    llm = LLM(model, **engine)
    llm.engine.generate(prompts[:8], _seeded(8, 32, len(prompts[:8]), None), use_tqdm=False)  # warm-up
    rows, stock = [], {}
    plan = [(f"best-of-{n}", n, dict(prm=SELF, keep=1.0)) for n in args.best_of]
    plan += [(name, *SETTINGS[name]) for name in args.settings]
    for name, n, fields in plan:
        row = run_setting(llm, prompts, problems, name, n, fields, args.max_tokens)
        if name.startswith("best-of"):  # the head's scores are for the AUROC, not part of best-of-N
            row["flops"] -= row["scoring_flops"]
            row["scoring_flops"] = 0
        rows.append(row)
        acc = sum(row["verifier"]) / len(problems)
        lo, hi = bootstrap_ci(row["verifier"])
        print(
            f"  {name:40s} acc {acc:.3f} [{lo:.3f}, {hi:.3f}] maj {sum(row['majority']) / len(problems):.3f} "
            f"{row['flops'] / 1e12:7.2f} TFLOP {row['wall_s']:6.1f}s rejected {row['rejected']}",
            flush=True,
        )
        if name == f"best-of-{max(args.best_of)}":
            rows += [derived(row, problems, k) for k in args.derive if k < row["n"] and k not in args.best_of]
        write_report(
            args, model, problems, _sorted(rows), stock, versions()
        )  # a partial report survives a kill
    llm.shutdown()
    stock.update(run_stock(model, prompts, 8, args.max_tokens, engine))
    print(f"  {stock['name']}: {stock['wall_s']:.1f}s", flush=True)
    ref = next((r for r in rows if r["name"] == "best-of-8"), None)
    if ref is not None:  # same seeds, same model: stock's candidates should be flopwise's
        stock["same_tokens"] = sum(a == b for a, b in zip(stock.pop("tokens"), ref["token_ids"]))
    stock.pop("tokens", None)
    largest = f"best-of-{max(args.best_of)}"
    stock["auroc"] = {f"{SELF} (final answers, {largest})": _final_auroc(rows, largest)}
    for r in rows:  # the other learned scorers: over the candidates that finished in their own settings
        if not r["name"].startswith("best-of") and r["config"]["prm"] not in (SELF, VERIFIER):
            stock["auroc"][f"{r['config']['prm']} (finished candidates of {r['name']})"] = _final_auroc(
                rows, r["name"]
            )
    write_report(args, model, problems, _sorted(rows), stock, versions())
    return 0


def _sorted(rows: list[dict]) -> list[dict]:
    """Baselines by N first, then the early-rejection settings in run order."""
    base = sorted((r for r in rows if r["name"].startswith("best-of")), key=lambda r: r["n"])
    return base + [r for r in rows if not r["name"].startswith("best-of")]


def _final_auroc(rows, name: str) -> float | None:
    """AUROC of the finished candidates' final scores in row ``name`` for a right answer (None: undefined)."""
    import math

    import torch

    from flopwise.prm.train import auroc

    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        return None
    value = auroc(torch.tensor(row["cand_scores"]), torch.tensor(row["cand_right"], dtype=torch.long))
    return None if math.isnan(value) else value


def _prompts(model: str, problems) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [p.prompt(tok) for p in problems]
