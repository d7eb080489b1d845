"""``flopwise convert sqa|moe-merge MODEL OUT``: run a checkpoint transform and write its report.

Calibration and distillation use local text (:mod:`flopwise.data`); perplexity is measured before and
after on a disjoint split. The output directory appears only once complete (temp dir + rename).
"""

from __future__ import annotations

import argparse
import time

from flopwise.convert.io import (
    ConvertError,
    check_output,
    ledger_summary,
    load,
    param_summary,
    save_atomically,
    source_dtype,
)
from flopwise_serve.common import say


def add_parser(sub) -> None:
    from flopwise_serve.common import non_negative_float, non_negative_int, positive_float, positive_int

    parser = sub.add_parser("convert", help="offline checkpoint transforms whose output stock vLLM loads")
    cvsub = parser.add_subparsers(dest="transform", required=True)
    sq = cvsub.add_parser(
        "sqa", help="fewer query heads (Sparse Query Attention) for Llama/Mistral/Qwen2/Qwen3"
    )
    mm = cvsub.add_parser("moe-merge", help="fewer experts / lower top-k for Mixtral, Qwen2-MoE, Qwen3-MoE")
    for c in (sq, mm):
        c.add_argument("model", help="local HF model directory")
        c.add_argument("out", help="output directory (written atomically)")
        c.add_argument("--force", action="store_true", help="replace OUT if it exists")
        c.add_argument(
            "--calib-blocks",
            type=positive_int,
            default=16,
            help="256-token blocks of local text for calibration",
        )
        c.add_argument(
            "--eval-blocks",
            type=positive_int,
            default=16,
            help="256-token blocks for perplexity before/after",
        )
    sq.add_argument(
        "--query-heads",
        type=positive_int,
        required=True,
        help="query heads to keep (a multiple of the KV heads)",
    )
    sq.add_argument(
        "--kv-heads",
        type=positive_int,
        default=None,
        help="KV heads to keep (divides the model's; default: all)",
    )
    sq.add_argument(
        "--method",
        choices=["select", "merge"],
        default="select",
        help="select: keep the heads of largest output norm; merge: fold the others into the kept ones",
    )
    sq.add_argument(
        "--refit-output",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refit each layer's o_proj by least squares on the calibration text (default: on)",
    )
    sq.add_argument(
        "--distill-steps",
        type=non_negative_int,
        default=0,
        help="self-distillation steps (batch 4 x 256 tokens)",
    )
    sq.add_argument("--lr", type=positive_float, default=2e-4, help="peak distillation learning rate")
    sq.add_argument(
        "--warmup", type=non_negative_int, default=20, help="linear warm-up steps before the cosine decay"
    )
    sq.add_argument(
        "--align",
        type=non_negative_float,
        default=0.0,
        help="weight of the attention-output alignment loss beside logit KD (0: KD only)",
    )
    sq.add_argument(
        "--eval-every",
        type=positive_int,
        default=50,
        help="evaluate held-out perplexity and write a resumable checkpoint (OUT.distill/) every K steps",
    )
    sq.add_argument(
        "--resume",
        action="store_true",
        help="continue the distillation from OUT.distill/ (same model and arguments)",
    )
    mm.add_argument(
        "--experts",
        type=positive_int,
        required=True,
        help="experts to keep per MoE layer (all of them with a lower --top-k reduces top-k only)",
    )
    mm.add_argument(
        "--method", choices=["mc-smoe", "reap", "hc-smoe", "frequency", "uniform"], default="mc-smoe"
    )
    mm.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="experts per token after the merge (default: unchanged)",
    )
    parser.set_defaults(run=lambda args, rest: run_convert(args))


def _say(msg: str) -> None:
    say("convert", msg)


def _calibration_rows(tokenizer, count: int, block: int = 256):
    from flopwise import data

    return data.token_blocks(tokenizer, "calib", block, count)


def run_convert(args) -> int:
    from flopwise_serve.common import fail

    try:
        return _run(args)
    except ConvertError as e:
        return fail("convert", str(e))


def _run(args) -> int:
    import torch

    from flopwise import data

    torch.manual_seed(0)
    out = check_output(args.out, args.force)
    t0 = time.monotonic()
    # Every argument is checked against config.json before any weight is loaded.
    arch, cfg_json = _config(args.model)
    if args.transform == "sqa":
        from flopwise.convert import sqa

        if arch not in sqa.ARCHITECTURES:
            raise ConvertError(
                f"MODEL architecture {arch!r} is not supported (supported: "
                f"{', '.join(sorted(sqa.ARCHITECTURES))})"
            )
        cfg = sqa.SQAConfig(args.query_heads, args.kv_heads, args.method)
        q = cfg_json.get("num_attention_heads") or 0
        cfg.resolve(q, cfg_json.get("num_key_value_heads") or q)
        ckpt = None
        if args.distill_steps:
            from flopwise.convert.checkpoint import DistillCheckpoint
            from flopwise_serve.convert_sqa import fingerprint

            ckpt = DistillCheckpoint(out, fingerprint(args))
            ckpt.check(args.resume)
        elif args.resume:
            raise ConvertError("--resume continues a distillation: it needs --distill-steps")
        model, tok, config = load(args.model, sqa.ARCHITECTURES)
        settings = {
            "transform": "sqa",
            "query_heads": args.query_heads,
            "kv_heads": args.kv_heads,
            "method": args.method,
            "distill_steps": args.distill_steps,
            "refit_output": args.refit_output,
        }
    else:
        from flopwise.convert import moe

        if arch not in moe.ARCHITECTURES:
            raise ConvertError(
                f"MODEL is a {arch}, not a MoE model (supported: {', '.join(sorted(moe.ARCHITECTURES))})"
            )
        cfg = moe.MoEMergeConfig(args.experts, args.method, args.top_k)
        key = "num_local_experts" if arch == "MixtralForCausalLM" else "num_experts"
        cfg.resolve(cfg_json.get(key) or 0, cfg_json.get("num_experts_per_tok") or 0)
        ckpt = None
        model, tok, config = load(args.model, moe.ARCHITECTURES)
        settings = {
            "transform": "moe-merge",
            "experts": args.experts,
            "method": args.method,
            "top_k": args.top_k,
        }

    ppl_before = data.perplexity(model, tok, count=args.eval_blocks)
    _say(f"perplexity before {ppl_before:.3f}; calibrating on {args.calib_blocks} blocks of local text")
    rows = _calibration_rows(tok, args.calib_blocks)
    if args.transform == "sqa":
        from flopwise_serve.convert_sqa import convert_and_distill

        new, extra = convert_and_distill(args, model, tok, cfg, rows, ckpt)
    else:
        stats = moe.calibrate(model, rows)
        new = moe.convert(model, cfg, stats)
        extra = {"routing_frequency": {i: s["freq"].tolist() for i, s in stats.items()}}

    ppl_after = data.perplexity(new, tok, count=args.eval_blocks)
    dtype = source_dtype(config)
    nbytes = torch.tensor([], dtype=dtype).element_size()
    new_config = new.config.to_dict()
    new_config["architectures"] = config["architectures"]
    report = {
        "source": args.model,
        **settings,
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "before": {**param_summary(model, nbytes), **ledger_summary(config)},
        "after": {**param_summary(new, nbytes), **ledger_summary(new_config)},
        "seconds": round(time.monotonic() - t0, 1),
        **extra,
    }
    save_atomically(new, tok, out, dtype, report)
    if ckpt is not None:
        ckpt.remove()  # OUT is complete: the training state is no longer needed
    b, a = report["before"], report["after"]
    _say(
        f"wrote {out}: params {b['params']:,} -> {a['params']:,}; decode FLOPs/token "
        f"{b['decode_flops_per_token_at_512']:,} -> "
        f"{a['decode_flops_per_token_at_512']:,}; perplexity {ppl_before:.3f} -> {ppl_after:.3f}"
    )
    return 0


def _config(model_dir: str) -> tuple[str, dict]:
    import os

    from flopwise.ledger import LedgerError, load_config

    if not os.path.isdir(model_dir):
        raise ConvertError(f"MODEL {model_dir!r} is not a local model directory")
    try:
        cfg = load_config(model_dir)
    except LedgerError as e:
        raise ConvertError(f"MODEL: {e}") from None
    return (cfg.get("architectures") or ["?"])[0], cfg
