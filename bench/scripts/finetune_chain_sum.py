"""Teach SmolLM2-135M-Instruct the step-per-line format of :mod:`flopwise.reasoning` on long chain sums.

The base model gets 6% of short 2-digit chain sums right and rarely keeps the format, too weak to show a
best-of-N curve. A short full fine-tune (fp32 master weights, bf16 autocast where the CPU has it; loss on
the answer only; 80 steps of 8 problems with 12-15 terms of 1-2 digits) makes it a usable but error-prone
generator: the early-rejection benchmark needs candidates that go wrong at some step (one sample is right
on about a third of its one-digit problems). Training problems use seeds disjoint from the benchmark's.

    python bench/scripts/finetune_chain_sum.py [--steps 80] [--out DIR]

Writes bf16 safetensors plus the tokenizer to ``$FLOPWISE_CACHE/models/SmolLM2-135M-chainsum-long``
(about 270 MB, not committed; re-run this script on a fresh machine: 21 minutes on 2 Xeon cores, fp32;
15 on 2 AMD EPYC cores with bf16 autocast, whose weights differ, so the self head fitted on one fine-tune
reads another's hidden states on the other).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from flopwise import hw
from flopwise.atomic import atomic_directory
from flopwise.models import resolve_model
from flopwise.reasoning import chain_sum, generator_dir

TRAIN_SEED = 1000  # the benchmark draws from seed 7; the PRM script from 2000


def encode(tok, problem) -> tuple[list[int], int]:
    p_ids = tok(problem.prompt(tok), add_special_tokens=False)["input_ids"]
    a_ids = tok(problem.solution() + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, len(p_ids)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-digits", type=int, default=2)
    ap.add_argument("--out", type=Path, default=generator_dir())
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    # trained on terms of 1-2 digits (a superset of the benchmark's one-digit problems)
    problems = chain_sum(args.steps * args.batch, seed=TRAIN_SEED, max_digits=args.max_digits)
    random.Random(0).shuffle(problems)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / args.steps)
    )
    use_bf16 = hw.default_dtype() == "bfloat16"
    t0, log = time.time(), []
    for step in range(args.steps):
        batch = [encode(tok, p) for p in problems[step * args.batch : (step + 1) * args.batch]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id or 0)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            mask[i, : len(seq)] = 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        log.append(round(loss.item(), 4))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    with atomic_directory(args.out) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (Path(tmp) / "finetune.json").write_text(
            json.dumps(
                {
                    "base": "SmolLM2-135M-Instruct",
                    "task": "chain_sum 12-15 terms",
                    "max_digits": args.max_digits,
                    "train_seed": TRAIN_SEED,
                    "steps": args.steps,
                    "batch": args.batch,
                    "lr": args.lr,
                    "seconds": round(time.time() - t0),
                    "loss": log,
                },
                indent=1,
            )
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
