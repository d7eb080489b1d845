"""``flopwise train-prm``: a learned head PRM on SmolLM2-135M hidden states, labelled by the verifier.

1. The generator (the chain_sum fine-tune) samples candidates for reasoning-gym problems (seeds disjoint
   from the benchmark's) through flopwise's vLLM engine.
2. The arithmetic verifier labels every step (right so far / wrong from the first error).
3. The embedded SmolLM2-135M-Instruct reads prompt + answer; a logistic head on its last hidden state at
   each step's newline is fitted on 80% of the problems; step AUROC is measured on the other 20%.

The head (a few KB) is written to ``--out`` with its AUROC; the committed one is ``head:chain-sum``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

TRACE_SEED = 2000


def add_parser(sub) -> None:
    from flopwise_serve.common import positive_int

    parser = sub.add_parser(
        "train-prm", help="fit a head PRM on SmolLM2 hidden states, labelled by the arithmetic verifier"
    )
    parser.add_argument(
        "--generator", default=None, help="model that samples the traces (default: the chain_sum fine-tune)"
    )
    parser.add_argument(
        "--base",
        default="default",
        help="model whose hidden states the head reads (default: embedded SmolLM2)",
    )
    parser.add_argument("--problems", type=positive_int, default=200)
    parser.add_argument("--samples", type=positive_int, default=4, help="candidates sampled per problem")
    parser.add_argument("--max-tokens", type=positive_int, default=96)
    parser.add_argument("--out", default="src/flopwise/prm/heads/chain-sum")
    parser.set_defaults(run=lambda args, rest: run_train_prm(args))


def sample_traces(generator: str, problems: int, n: int, max_tokens: int) -> list[tuple[str, str, int]]:
    """(prompt text, answer text, problem index) for ``n`` sampled candidates per problem."""
    from vllm import SamplingParams

    from flopwise.reasoning import chain_sum
    from flopwise_serve.offline import LLM

    llm = LLM(generator, max_model_len=512, block_size=32, seed=0)
    tok = llm.get_tokenizer()
    probs = chain_sum(problems, seed=TRACE_SEED)
    prompts = [p.prompt(tok) for p in probs]
    outs = llm.engine.generate(
        prompts, SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens), use_tqdm=False
    )
    llm.shutdown()
    return [(prompts[i], c.text, i) for i, out in enumerate(outs) for c in out.outputs]


def run_train_prm(args) -> int:
    import torch

    from flopwise.prm.hf import CONFIG, HeadPRM, save_head
    from flopwise.prm.train import auroc, fit_head, step_labels
    from flopwise.reasoning import generator_dir

    generator = args.generator or str(generator_dir())
    if not (Path(generator) / "config.json").is_file():
        raise SystemExit(
            f"flopwise train-prm: no generator at {generator}; run bench/scripts/finetune_chain_sum.py "
            "or pass --generator"
        )
    t0 = time.time()
    traces = sample_traces(generator, args.problems, args.samples, args.max_tokens)
    print(f"train-prm: {len(traces)} traces from {generator} in {time.time() - t0:.0f}s", flush=True)
    prm = HeadPRM("untrained", None, {"base": args.base, "layer": -1})
    feats, labels, groups = [], [], []
    for prompt, answer, problem in traces:
        steps, ys = step_labels(answer)
        keep = [i for i, y in enumerate(ys) if y is not None]
        if not keep:
            continue
        x = prm.features(prompt, steps)
        feats.append(x[keep])
        labels += [ys[i] for i in keep]
        groups += [problem] * len(keep)
    x, y, g = torch.cat(feats), torch.tensor(labels), torch.tensor(groups)
    held = set(random.Random(0).sample(range(args.problems), args.problems // 5))
    test = torch.tensor([int(p) in held for p in g.tolist()])
    weight, bias = fit_head(x[~test], y[~test])
    train_auc = auroc(x[~test] @ weight + bias, y[~test])
    test_auc = auroc(x[test] @ weight + bias, y[test])
    info = {
        "trained_on": f"{int((~test).sum())} steps of {args.problems - len(held)} chain_sum problems (seed "
        f"{TRACE_SEED})",
        "step_auroc_heldout": round(test_auc, 4),
        "step_auroc_train": round(train_auc, 4),
        "heldout_steps": int(test.sum()),
        "heldout_positive_rate": round(y[test].float().mean().item(), 3),
        "generator": "SmolLM2-135M-Instruct chain_sum fine-tune",
        "seconds": round(time.time() - t0),
    }
    out = save_head(args.out, args.base, weight, bias, -1, **info)
    print(
        f"train-prm: held-out step AUROC {test_auc:.3f} (train {train_auc:.3f}) on {int(test.sum())} steps; "
        "wrote "
        f"{out / CONFIG}"
    )
    print(json.dumps(info, indent=1))
    return 0
