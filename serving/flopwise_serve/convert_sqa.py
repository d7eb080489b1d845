"""``flopwise convert sqa``'s steps after the weights are loaded: head selection / merging, the o_proj refit,
and the distillation with its held-out curve and resumable checkpoints (OUT.distill/)."""

from __future__ import annotations

import sys

from flopwise_serve.common import say


def _say(msg: str) -> None:
    say("convert", msg)


def fingerprint(args) -> dict:
    """Everything that changes a distilled result (evaluation cadence and OUT do not)."""
    from flopwise import hw
    from flopwise.convert.checkpoint import fingerprint_source

    keys = (
        "query_heads",
        "kv_heads",
        "method",
        "calib_blocks",
        "refit_output",
        "distill_steps",
        "lr",
        "warmup",
        "align",
    )
    return {
        "source": fingerprint_source(args.model),
        **{k: getattr(args, k) for k in keys},
        "bf16": hw.default_dtype() == "bfloat16",
    }


def convert_and_distill(args, model, tok, cfg, rows, ckpt):
    """Convert, refit, and distil with evaluation and checkpoints every ``--eval-every`` steps."""
    from tqdm import tqdm

    from flopwise import data, hw
    from flopwise.convert import sqa

    importance = sqa.head_importance(model, rows)
    new = sqa.convert(model, cfg, importance)
    extra = {"head_importance_mean": importance.mean(0).tolist()}
    if args.refit_output:
        errors = sqa.refit_output(new, model, rows)
        extra["refit_relative_error_per_layer"] = [round(e, 5) for e in errors]
        _say(f"o_proj refit: mean relative error of the attention output {sum(errors) / len(errors):.4f}")
    if not args.distill_steps:
        return new, extra
    dcfg = sqa.DistillConfig(
        args.distill_steps, lr=args.lr, warmup=min(args.warmup, args.distill_steps), align=args.align
    )
    state, opt_state = None, None
    if args.resume:
        saved = ckpt.load()
        new.load_state_dict(saved["student"])
        state, opt_state = sqa.DistillState(**saved["state"]), saved["optimizer"]
        state.resumed_at.append(state.step)
        _say(f"resuming the distillation at step {state.step} of {dcfg.steps} from {ckpt.dir}")
    else:  # the curve starts where distillation does: after the conversion (and refit)
        state = sqa.DistillState(
            curve=[{"step": 0, "perplexity": data.perplexity(new, tok, count=args.eval_blocks)}]
        )
    train = data.token_blocks(tok, "train", 256, dcfg.steps * dcfg.batch, at_most=True)
    bar = tqdm(total=dcfg.steps, initial=state.step, desc="distilling", file=sys.stderr)

    def on_every(st, opt):
        ppl = data.perplexity(new, tok, count=args.eval_blocks)
        recent = st.losses[-args.eval_every :]
        st.curve.append({"step": st.step, "perplexity": ppl, "loss": sum(recent) / len(recent)})
        loss = st.curve[-1]["loss"]
        bar.write(f"flopwise convert: step {st.step}: held-out perplexity {ppl:.3f}, loss {loss:.4f}")
        ckpt.save(new, opt, st)

    state = sqa.distill(
        new,
        model,
        train,
        dcfg,
        state=state,
        optimizer_state=opt_state,
        every=args.eval_every,
        on_every=on_every,
        bf16=hw.default_dtype() == "bfloat16",
        progress=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")),
    )
    bar.close()
    extra["distill"] = {
        "steps": dcfg.steps,
        "lr": dcfg.lr,
        "warmup": dcfg.warmup,
        "min_lr_ratio": dcfg.min_lr_ratio,
        "batch": dcfg.batch,
        "block": 256,
        "align": dcfg.align,
        "train_rows": int(train.shape[0]),
        "curve": state.curve,
        "resumed_at": state.resumed_at,
    }
    extra["distill_kl_first_last"] = state.losses[:1] + state.losses[-1:]
    return new, extra
