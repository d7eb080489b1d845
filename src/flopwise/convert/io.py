"""What the checkpoint transforms share: load a HF model, write the result atomically, report on it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class ConvertError(ValueError):
    """Bad arguments for a transform; the message names the argument. Nothing has been written."""


def load(model_dir: str, supported: set[str]):
    """(model in float32, tokenizer, config dict) for a local HF model of a supported architecture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flopwise.ledger import load_config

    if not os.path.isdir(model_dir):
        raise ConvertError(f"MODEL {model_dir!r} is not a local model directory")
    cfg = load_config(model_dir)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in supported:
        raise ConvertError(
            f"MODEL architecture {arch!r} is not supported here (supported: {', '.join(sorted(supported))})"
        )
    kwargs = {"dtype": torch.float32}
    if cfg.get("model_type") in ("mixtral", "qwen2_moe", "qwen3_moe"):
        kwargs["experts_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir), cfg


def check_output(out: str, force: bool) -> Path:
    path = Path(out)
    if path.exists() and not force:
        raise ConvertError(f"OUT {out!r} already exists (pass --force to replace it)")
    return path


def ledger_summary(config: dict) -> dict:
    """FLOPs per token from the ledger: a decode step at 512 tokens of context, and a 2048-token prefill."""
    from flopwise.ledger import FlopModel

    m = FlopModel.from_pretrained(config)
    decode = m.forward(1, start=511, logits=1)
    prefill = m.forward(2048, start=0, logits=1)
    return {
        "decode_flops_per_token_at_512": decode.total,
        "prefill_flops_per_token_at_2048": prefill.total // 2048,
        "prefill_attention_flops_2048": prefill.flops.get("attention", 0),
        "decode_components": decode.as_dict(),
    }


def param_summary(model, dtype_bytes: int) -> dict:
    """Parameters and bytes of the whole model, and of its routed experts alone (0 for a dense model)."""
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return {"params": n, "weight_bytes": n * dtype_bytes, "expert_weight_bytes": experts * dtype_bytes}


def save_atomically(model, tokenizer, out: Path, dtype, report: dict) -> None:
    """Write model, tokenizer and ``flopwise_report.json`` so that OUT appears complete or not at all."""
    from flopwise.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report = {**report, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "flopwise_report.json").write_text(json.dumps(report, indent=1) + "\n")


def calibration_pass(model, rows, hooks: list, batch: int = 4) -> None:
    """Run ``rows`` through ``model`` with forward ``hooks`` (handles) installed, then remove them."""
    import torch

    try:
        with torch.no_grad():
            for b in range(0, rows.shape[0], batch):
                model(input_ids=rows[b : b + batch])
    finally:
        for h in hooks:
            h.remove()


def source_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
