"""``flopwise bench visual``: visual token dropping vs stock vLLM on the same VLM, in one run.

The accuracy model is the tiny LLaVA trained on :mod:`flopwise.scenes` (``bench/scripts/train_tiny_vlm.py``,
every image token always seen in training, so it can rank methods). Each engine runs in its own process, so
the stock one really is stock: ``VLLM_PLUGINS=""`` loads no flopwise code (vLLM's own LLaVA class and
scheduler). For every method and keep ratio the whole question set goes in one ``generate`` call (greedy);
each row keeps every question's right/wrong, so the report gives bootstrap CIs over questions and the paired
difference against stock vLLM on the same questions, per question kind too. A second part times every method
at a realistic shape (random weights: wall time only). Writes ``bench/results/visual.md`` with a PNG plot and
the raw JSON (:mod:`flopwise_bench.visual_report`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from flopwise import hw, scenes
from flopwise.ledger import FlopModel
from flopwise_bench.common import run_worker
from flopwise_bench.visual_report import MAX_TOKENS, reference, write_report

DEFAULT_MODEL = "bench/models/tiny-vlm-scenes"
METHODS = ["visiondrop", "cls_attention", "divprune", "visionzip", "cdpruner", "uniform", "random"]
# Speed at a realistic shape: SmolLM2-135M's language model behind a small CLIP tower at LLaVA-1.5's
# 336 px / 14 px patches (576 image tokens); random weights, so wall time only. The LM is ~97% of prefill,
# close to LLaVA-1.5-7B's split (CLIP-L is ~4% of its prefill).
SPEED_VISION = dict(
    model_type="clip_vision_model",
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=5,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=256,
)


def speed_model() -> str:
    """Build (once, in the cache) the random-weight LLaVA of SmolLM2-135M's shape the speed table uses."""
    import torch
    import transformers

    from flopwise.atomic import atomic_directory
    from flopwise.hf import tiny
    from flopwise.models import cache_dir, default_model_path

    out = cache_dir() / "bench-visual" / "llava-smollm2-shape"
    if (out / "config.json").exists():
        return str(out)
    text = json.loads((Path(default_model_path()) / "config.json").read_text())
    text = {k: v for k, v in text.items() if not k.startswith("_") and k not in ("architectures", "dtype")}
    config = transformers.LlavaConfig(
        text_config=text,
        vision_config=SPEED_VISION,
        image_token_index=3,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.bfloat16)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer = tiny.train_tokenizer(str(tmp))
        tiny.save_processor("llava", config, tokenizer, str(tmp))
        tiny.legacy_llava_keys(str(tmp))
    return str(out)


def _prompts(tok, examples, keep: float | None, method: str | None, layer: int | None = None) -> list[dict]:
    out = []
    for e in examples:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "<image>" + e.question}], tokenize=False, add_generation_prompt=True
        )
        req = {"prompt": text, "multi_modal_data": {"image": e.pil()}}
        if keep is not None:
            req["mm_processor_kwargs"] = {"visual_keep": keep, "visual_drop": method}
            if layer is not None:
                req["mm_processor_kwargs"]["visual_drop_layer"] = layer
        out.append(req)
    return out


def worker(spec: dict) -> dict:
    """Run one engine (stock or flopwise) over ``spec["settings"]``; returns rows of measurements."""
    from vllm import LLM, SamplingParams

    from flopwise_serve.offline import flops_of, set_engine_env

    set_engine_env()
    model, examples = spec["model"], scenes.dataset(spec["questions"], seed=spec["seed"])
    # No prefix or processor cache: every timed run recomputes its images instead of replaying the last one.
    kwargs = dict(
        dtype=hw.default_dtype(),
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        max_num_seqs=spec["batch"],
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
    )
    if spec["stock"]:
        llm = LLM(model, **kwargs)
    else:
        from flopwise_vllm import SCHEDULER_CLS

        llm = LLM(model, scheduler_cls=SCHEDULER_CLS, **kwargs)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    ledger = FlopModel.from_pretrained(model)
    warm = scenes.dataset(4, seed=spec["seed"] + 1)
    tok = llm.get_tokenizer()
    llm.generate(_prompts(tok, warm, None, None), params, use_tqdm=False)  # warm-up
    rows = []
    for setting in spec["settings"]:
        keep, method = setting.get("keep"), setting.get("method")
        prompts = _prompts(tok, examples, keep, method, setting.get("layer"))
        walls = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
        right = [int(scenes.is_correct(o.outputs[0].text, e)) for o, e in zip(outs, examples)]
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        if spec["stock"]:  # stock vLLM charges nothing: the ledger's closed form for what it ran
            prefill = sum(
                ledger.vision(1).total + ledger.forward(len(o.prompt_token_ids), logits=1).total for o in outs
            )
        else:
            prefill = sum(flops_of(o)["prompt"] for o in outs)
        rows.append(
            {
                **setting,
                "wall_s": min(walls),
                "accuracy": sum(right) / len(examples),
                "right": right,
                "kinds": [e.kind for e in examples],
                "prefill_flops": prefill,
                "prompt_tokens": prompt_tokens,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows}


def _run_worker(spec: dict, stock: bool, log: Path) -> list[dict]:
    return run_worker("flopwise_bench.visual_drop", spec, stock, log, timeout=3600)["rows"]


def bench_visual(args) -> int:
    model = args.model or DEFAULT_MODEL
    if not os.path.isdir(model):
        print(
            f"flopwise bench visual: error: no model at {model} (train it: bench/scripts/train_tiny_vlm.py)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    base = {
        "model": model,
        "questions": args.questions,
        "seed": 10_000,
        "reps": args.reps,
        "batch": args.batch,
    }
    print(f"{model}: stock vLLM, flopwise, stock vLLM ({args.questions} questions) ...", flush=True)
    stock, ref, rows = _against_stock(base, _settings(model, args.methods, args.keep), log)
    speed = None
    if args.speed_requests:
        shape = speed_model()
        print(
            f"speed at SmolLM2-135M shape: stock, flopwise ({len(args.methods)} methods), stock ...",
            flush=True,
        )
        s_stock, s_ref, s_rows = _against_stock(
            {**base, "model": shape, "questions": args.speed_requests},
            _settings(shape, args.methods, [k for k in args.keep if k < 1]),
            log,
        )
        speed = {"model": shape, "stock": s_stock, "ref": s_ref, "rows": s_rows}
    names = ("questions", "reps", "batch", "keep", "methods", "speed_requests")
    settings = {k: getattr(args, k) for k in names}
    write_report(settings, model, stock, rows, out, speed)
    return 0


def _settings(model: str, methods: list[str], keeps: list[float]) -> list[dict]:
    """Every method at every keep ratio (keep 1 once: every method is the full model there), plus visiondrop
    dropping halfway up the vision tower."""
    half = FlopModel.from_pretrained(model).spec.vision.layers // 2
    settings = [{"method": methods[0], "keep": 1.0}] if 1.0 in keeps else []
    settings += [{"method": m, "keep": k} for m in methods for k in keeps if k < 1]
    return settings + [{"method": "visiondrop", "keep": k, "layer": half} for k in keeps if k < 1]


def _against_stock(base: dict, settings: list[dict], log: Path) -> tuple[list[dict], dict, list[dict]]:
    """Stock vLLM, the flopwise engine over ``settings``, stock vLLM again: (stock runs, reference, rows)."""
    stock_run = {**base, "settings": [{"method": "stock", "keep": 1.0}]}
    stock = _run_worker(stock_run, True, log)
    rows = _run_worker({**base, "settings": settings}, False, log)
    stock += _run_worker(stock_run, True, log)
    ref = reference(stock)
    for r in rows:
        r["flop_cut"] = ref["prefill_flops"] / r["prefill_flops"]
        r["speedup"] = ref["wall_s"] / r["wall_s"]
        r["rel_accuracy"] = r["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
    return stock, ref, rows


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    Path(spec["result"]).write_text(json.dumps(worker(spec)))
