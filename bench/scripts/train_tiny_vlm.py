"""Train the tiny LLaVA the visual-dropping benchmark ranks methods on (no real VLM weights offline).

    .venv/bin/python bench/scripts/train_tiny_vlm.py --out bench/models/tiny-vlm-scenes

A CLIP-style tower (256x256 images, 16-pixel patches: 256 image tokens) and a 4-layer Llama trained from
scratch on :mod:`flopwise.scenes` (colour, shape, count, left/above relations, the odd one out), every
kind in every batch. The language model always sees every image token, as a pretrained VLM does: a model
trained on random token subsets as well (``--aug``, the old default) learns to read any subset and
favours random dropping, so it cannot rank methods. Fixed seed; the weights (bf16, ~8 MB) are committed
and the held-out accuracy per kind is in TRAINING.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from flopwise import scenes
from flopwise.hf import tiny

CONFIG = dict(
    architectures=["LlavaForConditionalGeneration"],
    model_type="llava",
    image_token_index=3,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    projector_hidden_act="gelu",
    tie_word_embeddings=False,
    text_config=dict(
        tiny._TEXT,
        model_type="llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    ),
    vision_config=dict(
        model_type="clip_vision_model",
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=3,
        image_size=256,
        patch_size=16,
        projection_dim=64,
    ),
)


def build(out_dir: str, init: str | None = None):
    """A fresh model (or ``init``'s weights, to train on), its tokenizer and processor written to
    ``out_dir``."""
    import transformers

    cfg = json.loads(json.dumps(CONFIG))
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    if init:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    else:
        model = transformers.LlavaForConditionalGeneration(config)
    tokenizer = tiny.train_tokenizer(out_dir)
    tiny.save_processor("llava", config, tokenizer, out_dir)  # writes processor files (no weights yet)
    return model, tokenizer, transformers.AutoProcessor.from_pretrained(out_dir)


def pieces(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image in the rendered chat prompt."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>" + question}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split("<image>")
    return tokenizer.encode(before), tokenizer.encode(after)


def batch_loss(model, processor, tokenizer, examples, keep: float | None, rng: random.Random):
    pv = processor.image_processor([e.pil() for e in examples], return_tensors="pt")["pixel_values"]
    feats = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[
        CONFIG["vision_feature_layer"]
    ][:, 1:]
    n = feats.shape[1]
    if keep is not None:  # the same count per batch, a different random subset per example
        k = max(1, round(keep * n))
        idx = torch.stack([torch.sort(torch.tensor(rng.sample(range(n), k))).values for _ in examples])
        feats = torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1]))
    image = model.model.multi_modal_projector(feats)
    embed = model.get_input_embeddings()
    rows, labels = [], []
    for img, e in zip(image, examples):
        before, after = pieces(tokenizer, e.question)
        tgt = tokenizer.encode(" " + e.answer) + [tokenizer.eos_token_id]
        rows.append(torch.cat([embed(torch.tensor(before)), img, embed(torch.tensor(after + tgt))]))
        labels.append([-100] * (len(before) + img.shape[0] + len(after)) + tgt)
    # Right padding: causal attention never lets a real token see the pads after it.
    width = max(len(lab) for lab in labels)
    pad = embed(torch.tensor([tokenizer.pad_token_id]))
    rows = [torch.cat([r, pad.expand(width - r.shape[0], -1)]) for r in rows]
    labels = [lab + [-100] * (width - len(lab)) for lab in labels]
    return model(inputs_embeds=torch.stack(rows), labels=torch.tensor(labels)).loss


@torch.no_grad()
def accuracy(model, processor, tokenizer, examples) -> dict[str, float]:
    """Greedy accuracy with every image token, overall and per question kind."""
    from flopwise.hf import visual
    from flopwise.techniques.visual_drop import VisualDropConfig

    right: dict[str, list[bool]] = {k: [] for k in scenes.KINDS}
    for e in examples:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>" + e.question}], tokenize=False, add_generation_prompt=True
        )
        ids = visual.generate(model, processor, e.pil(), text, VisualDropConfig(keep=1.0), max_tokens=4)
        right[e.kind].append(scenes.is_correct(tokenizer.decode(ids, skip_special_tokens=True), e))
    out = {k: sum(v) / len(v) for k, v in right.items() if v}
    out["all"] = sum(sum(v) for v in right.values()) / len(examples)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/models/tiny-vlm-scenes")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="continue from this trained model (use another --seed for new data)")
    ap.add_argument("--heldout", type=int, default=200, help="questions for the final accuracy (seed 10000)")
    ap.add_argument(
        "--aug", type=float, default=0.0, help="share of batches that see a random subset of image tokens"
    )
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from flopwise.atomic import atomic_directory

    with atomic_directory(args.out) as tmp:
        model, tokenizer, processor = build(str(tmp), args.init)
        before = json.loads((Path(args.init) / "TRAINING.json").read_text()) if args.init else None
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        )
        rng = random.Random(args.seed)
        t0, curve = time.time(), []
        for step in range(args.steps):
            examples = [scenes.make(rng, scenes.KINDS[i % len(scenes.KINDS)]) for i in range(args.batch)]
            keep = rng.uniform(0.04, 1.0) if rng.random() < args.aug else None
            loss = batch_loss(model, processor, tokenizer, examples, keep, rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 25 == 0 or step == args.steps - 1:
                curve.append((step, round(loss.item(), 4)))
                print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
        model.eval()
        acc = accuracy(model, processor, tokenizer, scenes.dataset(args.heldout, seed=10_000))
        print("held-out accuracy at full tokens:", json.dumps(acc))
        model.to(torch.bfloat16).save_pretrained(tmp)
        tiny.legacy_llava_keys(str(tmp))
        (tmp / "TRAINING.json").write_text(
            json.dumps(
                {**vars(args), "heldout_accuracy_full": acc, "seconds": round(time.time() - t0)}
                | {"loss": curve, "continued_from": before},
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
