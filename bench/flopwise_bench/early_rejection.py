"""``flopwise bench early-rejection``: best-of-N with PRM selection vs early rejection, one run, same
problems.

Generator: SmolLM2-135M-Instruct fine-tuned on chain_sum by ``bench/scripts/finetune_chain_sum.py``.
Every setting runs the same reasoning-gym problems, all at once, through the flopwise scheduler (one
engine, engine seed fixed); best-of-N is the same path with ``keep=1`` (final PRM scores only). Stock
vLLM (its own scheduler, no flopwise) runs best-of-8 on the same problems in the same process for the
wall-time reference. FLOPs are the ledger's: prefill, decode and every PRM pass.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from flopwise import hw
from flopwise.reasoning import chain_sum, generator_dir, is_correct
from flopwise.techniques.early_rejection import survivors

PROBLEM_SEED = 7
READING = [
    "",
    "Reading: answers here are short (about 35 tokens) next to a ~45-token prompt that every candidate "
    "prefills",
    "(vLLM shares only full KV blocks between n>1 children), so rejected candidates still pay most of their "
    "cost;",
    "the paper's gains come from long reasoning. With the exact verifier, keeping a fixed fraction also "
    "rejects",
    "candidates that are right so far, which costs accuracy at small keep. The learned head PRM re-reads "
    "prompt +",
    "answer at every checkpoint (no KV reuse), so its passes cost more than the generation they prune. "
    "Accuracy on",
    "40 problems moves by about +-0.08 between runs (no per-request seeds: see the session notes).",
]


def _settings(args) -> list[dict]:
    rows = [
        {"name": f"best-of-{n}", "n": n, "every": 10**6, "steps": None, "keep": 1.0} for n in args.best_of
    ]
    for n in args.er_n:
        for keep in args.keep:
            for steps in args.every_steps:
                rows.append(
                    {
                        "name": f"ER n={n} every={steps} step keep={keep}",
                        "n": n,
                        "every": args.step_cap,
                        "steps": steps,
                        "keep": keep,
                    }
                )
            for every in args.every:
                rows.append(
                    {
                        "name": f"ER n={n} every={every} tok keep={keep}",
                        "n": n,
                        "every": every,
                        "steps": None,
                        "keep": keep,
                    }
                )
    return rows


def _best(output, stats: dict) -> str | None:
    """Text of the best finished candidate by final PRM score (ties to the lower index)."""
    scores = {int(k): v for k, v in stats.get("scores", {}).items()}
    done = sorted(
        (c for c in output.outputs if c.stop_reason != "early_rejection" and c.index in scores),
        key=lambda c: c.index,
    )
    if not done:
        return None
    return done[survivors([scores[c.index] for c in done], 1)[0]].text


def run_setting(llm, prompts, problems, setting: dict, prm: str, max_tokens: int) -> dict:
    from vllm import SamplingParams

    from flopwise.techniques.early_rejection import EarlyRejectionConfig
    from flopwise_serve.offline import flops_of

    config = EarlyRejectionConfig(
        prm=prm, every_tokens=setting["every"], every_steps=setting["steps"], keep=setting["keep"]
    )
    params = SamplingParams(
        n=setting["n"],
        temperature=0.8,
        max_tokens=max_tokens,
        extra_args={"early_rejection": config.model_dump_json()},
    )
    t0 = time.perf_counter()
    outs = llm.engine.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    correct = flops = prm_flops = tokens = rejected = 0
    for problem, out in zip(problems, outs):
        payload = out.ec_transfer_params["flopwise"]
        stats = payload["early_rejection"]
        best = _best(out, stats)
        correct += best is not None and is_correct(problem, best)
        flops += flops_of(out)["total"]
        prm_flops += payload["prm"]
        tokens += sum(len(c.token_ids) for c in out.outputs)
        rejected += stats["rejected"]
    return {
        **setting,
        "prm": prm,
        "accuracy": correct / len(problems),
        "flops": flops,
        "prm_flops": prm_flops,
        "wall_s": wall,
        "tokens": tokens,
        "rejected": rejected,
    }


def run_stock(model: str, prompts, problems, n: int, max_tokens: int, block_size: int) -> dict:
    """Stock vLLM (its own scheduler) best-of-n: wall time, and accuracy with the verifier choosing after."""
    import gc

    from vllm import LLM, SamplingParams

    from flopwise.prm import load_prm
    from flopwise_serve.offline import set_engine_env

    set_engine_env()  # the small KV cache and core settings flopwise's LLM uses
    llm = LLM(
        model,
        dtype=hw.default_dtype(),
        enforce_eager=True,
        max_model_len=512,
        block_size=block_size,
        seed=0,
        scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler",
    )
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(n=n, temperature=0.8, max_tokens=max_tokens), use_tqdm=False)
    wall = time.perf_counter() - t0
    verifier = load_prm("verifier:arithmetic")
    correct = 0
    for problem, out in zip(problems, outs):
        cands = sorted(out.outputs, key=lambda c: c.index)
        best = survivors([verifier.score("", c.text, final=True)[0] for c in cands], 1)[0]
        correct += is_correct(problem, cands[best].text)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {
        "name": f"stock vLLM best-of-{n} (verifier)",
        "n": n,
        "accuracy": correct / len(problems),
        "wall_s": wall,
    }


def bench_early_rejection(args) -> int:
    from flopwise_bench.common import versions
    from flopwise_serve.offline import LLM

    model = args.model or str(generator_dir())
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(
            f"flopwise bench early-rejection: no generator at {model}; make it with "
            "`python bench/scripts/finetune_chain_sum.py` (a few minutes) or pass --model"
        )
    problems = chain_sum(args.problems, seed=PROBLEM_SEED)
    print(f"bench early-rejection: {model}\n  {hw.describe()}; {len(problems)} chain_sum problems")
    stock = run_stock(model, *_prompts(model, problems), args.stock_n, args.max_tokens, args.block_size)
    print(f"  {stock['name']}: accuracy {stock['accuracy']:.2f}, {stock['wall_s']:.1f}s", flush=True)
    llm = LLM(model, max_model_len=512, block_size=args.block_size, seed=0)
    prompts, _ = _prompts(model, problems)
    llm.engine.generate(prompts[:2], use_tqdm=False)  # warm-up
    rows = []
    for prm in args.prm:
        for setting in _settings(args):
            row = run_setting(llm, prompts, problems, setting, prm, args.max_tokens)
            rows.append(row)
            print(
                f"  {prm:20s} {row['name']:28s} acc {row['accuracy']:.2f}  {row['flops'] / 1e12:7.2f} TFLOP "
                f"({row['prm_flops'] / 1e12:.2f} PRM)  {row['wall_s']:6.1f}s  rejected {row['rejected']}",
                flush=True,
            )
    llm.shutdown()
    write_report(args, model, problems, rows, stock, versions())
    return 0


def _prompts(model: str, problems) -> tuple[list[str], list]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [p.prompt(tok) for p in problems], problems


def write_report(args, model, problems, rows, stock, versions) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Early rejection with process reward models (`flopwise bench early-rejection`)",
        "",
        f"- Date: {datetime.date.today()}; hardware: {hw.describe()}; {versions}",
        "- Generator: SmolLM2-135M-Instruct fine-tuned on chain_sum "
        f"(`bench/scripts/finetune_chain_sum.py`), {model}",
        f"- Problems: {len(problems)} reasoning-gym chain_sum (3-6 terms, 1-2 digits, seed {PROBLEM_SEED}); "
        "temperature 0.8, "
        f"max {args.max_tokens} tokens; KV block size {args.block_size} (so candidates share the prompt's "
        "full blocks)",
        "- All settings run through one flopwise engine (engine seed 0), all problems at once; best-of-N is "
        "the same "
        "path with keep=1 (PRM scores only finished candidates). FLOPs: the ledger's charge, prefill + "
        "decode + PRM.",
        "- Accuracy: the best finished candidate by final PRM score has the exact answer.",
        "",
        f"Stock vLLM best-of-{stock['n']} (its own scheduler, verifier picks afterwards): accuracy "
        f"{stock['accuracy']:.3f}, "
        f"wall {stock['wall_s']:.1f} s.",
        "",
        "| PRM | setting | accuracy | TFLOP | of which PRM | vs best-of-8 FLOPs | wall s | vs best-of-8 "
        "wall | tokens | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # what each PRM's settings are compared with
    refs = {r["prm"]: r for r in rows if r["name"] == "best-of-8"}
    for prm in dict.fromkeys(r["prm"] for r in rows):
        ref = refs.get(prm)
        for r in (r for r in rows if r["prm"] == prm):
            fc = f"{ref['flops'] / r['flops']:.2f}x fewer" if ref else "-"
            wc = f"{ref['wall_s'] / r['wall_s']:.2f}x faster" if ref else "-"
            lines.append(
                f"| {prm} | {r['name']} | {r['accuracy']:.3f} | {r['flops'] / 1e12:.2f} | "
                f"{r['prm_flops'] / 1e12:.2f} "
                f"| {fc} | {r['wall_s']:.1f} | {wc} | {r['tokens']} | {r['rejected']} |"
            )
    lines += [
        "",
        "Target (issue): >= 4x fewer FLOPs and >= 2.5x less wall time than best-of-8 at equal or better "
        "accuracy.",
        "",
    ]
    for prm, ref in refs.items():
        ok = [
            r
            for r in rows
            if r["prm"] == prm and r["name"].startswith("ER") and r["accuracy"] >= ref["accuracy"]
        ]
        best = max(ok, key=lambda r: ref["flops"] / r["flops"], default=None)
        if best is None:
            lines.append(
                f"- {prm}: no early-rejection setting matched best-of-8's accuracy ({ref['accuracy']:.3f})."
            )
        else:
            fx, wx = ref["flops"] / best["flops"], ref["wall_s"] / best["wall_s"]
            met = "met" if fx >= 4 and wx >= 2.5 else "not met"
            lines.append(
                f"- {prm}: best at equal-or-better accuracy is {best['name']} ({best['accuracy']:.3f} vs "
                f"{ref['accuracy']:.3f}): {fx:.2f}x fewer FLOPs, {wx:.2f}x less wall time - target {met}."
            )
    lines += READING
    png = out.with_suffix(".png")
    _plot(rows, png)
    lines += ["", f"![FLOPs vs accuracy]({png.name})", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "stock": stock}, indent=1))
    print(f"wrote {out}, {png}")


def _plot(rows, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prm in dict.fromkeys(r["prm"] for r in rows):
        for kind, marker in (("best-of", "s"), ("ER", "o")):
            pts = [r for r in rows if r["prm"] == prm and r["name"].startswith(kind)]
            if pts:
                ax.scatter(
                    [r["flops"] / 1e12 for r in pts],
                    [r["accuracy"] for r in pts],
                    marker=marker,
                    label=f"{kind} ({prm})",
                )
                for r in pts:
                    ax.annotate(r["name"].replace("ER ", ""), (r["flops"] / 1e12, r["accuracy"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("TFLOP (ledger: generation + PRM)")
    ax.set_ylabel("accuracy")
    ax.set_title("chain_sum: best-of-N vs early rejection")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
