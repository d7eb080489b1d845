"""Train the tiny MoE language model that the MoE-merging benchmark uses (no MoE with real weights is
available offline). Mixtral architecture, 8 experts, top-2, ~3M parameters, on Python stdlib sources
with flopwise's tiny BPE tokenizer. About ten minutes on 2 CPU cores.

    python bench/scripts/train_tiny_moe.py --out bench/models/tiny-moe [--steps 700]

The committed model was trained with the defaults below and --steps 700 (bench/models/tiny-moe/training.json).
"""

import argparse
import json
import math
import os
import time

import torch
import transformers

from flopwise import data
from flopwise.atomic import atomic_directory
from flopwise.hf.tiny import train_tokenizer

CONFIG = dict(
    model_type="mixtral",
    architectures=["MixtralForCausalLM"],
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.02,
    output_router_logits=True,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/models/tiny-moe")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    torch.manual_seed(0)
    with atomic_directory(args.out) as tmp:
        train(args, tmp)
    print(f"saved to {args.out}")


def train(args, tmp):
    tok = train_tokenizer(str(tmp))
    cfg = {k: v for k, v in CONFIG.items() if k != "architectures"}
    config = transformers.AutoConfig.for_model(**cfg)
    config.architectures = CONFIG["architectures"]
    model = transformers.MixtralForCausalLM(config)
    rows = data.token_blocks(tok, "train", args.block, 4800)  # ~1.2M tokens, sampled with replacement
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, rows.shape[0], (args.batch,))
        x = rows[idx]
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {out.loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.config.output_router_logits = False
    ppl = data.perplexity(model, tok)
    model.to(torch.bfloat16).save_pretrained(tmp)
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(
            {
                "steps": args.steps,
                "batch": args.batch,
                "block": args.block,
                "lr": args.lr,
                "eval_perplexity": ppl,
                "seconds": round(time.time() - t0),
                "params": sum(p.numel() for p in model.parameters()),
            },
            f,
            indent=1,
        )
    print(f"eval perplexity {ppl:.2f}")


if __name__ == "__main__":
    main()
