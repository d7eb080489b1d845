"""Why the tiny scenes LLaVA loses accuracy under every dropping method: its kept image tokens are renumbered.

    .venv/bin/python bench/scripts/visual_positions.py [--questions 200]

vLLM's LLaVA (like the papers' LLaVA code) gives the kept image tokens consecutive 1-D positions, so dropping
moves every kept token and the text after the image. This runs the transformers oracle twice per setting on
the same held-out questions: positions renumbered (what the engine does), and the kept tokens at their
original positions with the text after the image where it was (what M-RoPE models get in flopwise). Writes
bench/results/visual_positions.json (per-question results; the visual report adds a table with CIs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def main() -> None:
    import transformers

    from flopwise import scenes
    from flopwise.hf import visual
    from flopwise.techniques import visual_drop as vd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench/models/tiny-vlm-scenes")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--out", default="bench/results/visual_positions.json")
    args = ap.parse_args()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    proc = transformers.AutoProcessor.from_pretrained(args.model)
    tok, image_id = proc.tokenizer, model.config.image_token_index
    examples = scenes.dataset(args.questions, seed=10_000)

    @torch.no_grad()
    def right(e, config: vd.VisualDropConfig, original: bool) -> int:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "<image>" + e.question}], tokenize=False, add_generation_prompt=True
        )
        p = visual.prepare(model, proc, e.pil(), text, config)
        ids = proc(text=[text], images=[e.pil()], return_tensors="pt")["input_ids"][0]
        offset, full = int((ids == image_id).nonzero()[0]), int((ids == image_id).sum())
        if original:  # decoding continues after the last prompt position: index + delta
            length = p.embeds.shape[1]
            after = length - offset - p.image_tokens
            pos = torch.cat([torch.arange(offset), offset + p.kept, offset + full + torch.arange(after)])
            p = dataclasses.replace(p, positions=pos[None], delta=int(pos[-1]) + 1 - length)
        out = visual.greedy(model, p, 4, tok.eos_token_id)
        return int(scenes.is_correct(tok.decode(out, skip_special_tokens=True), e))

    rows = []
    for method, keep in [
        ("visiondrop", 1.0),
        ("divprune", 0.25),
        ("random", 0.25),
        ("divprune", 0.1),
        ("random", 0.1),
    ]:
        for original in [False] if keep == 1.0 else [False, True]:
            config = vd.VisualDropConfig(keep=keep, method=method)
            r = [right(e, config, original) for e in examples]
            rows.append({"method": method, "keep": keep, "original_positions": original, "right": r})
            print(method, keep, "original" if original else "renumbered", sum(r) / len(r), flush=True)
    Path(args.out).write_text(
        json.dumps({"model": args.model, "questions": args.questions, "rows": rows}) + "\n"
    )


if __name__ == "__main__":
    main()
