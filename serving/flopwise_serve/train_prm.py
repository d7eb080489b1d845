"""``flopwise train-prm``: a learned head PRM, labelled by the verifier.

1. The generator (the chain_sum fine-tune) samples candidates for reasoning-gym problems (seeds disjoint
   from the benchmark's) through flopwise's vLLM engine.
2. The arithmetic verifier labels every step (right so far / wrong from the first error).
3. A logistic head is fitted on 80% of the problems; step AUROC is measured on the other 20%. It reads
   either the embedded SmolLM2-135M-Instruct's last hidden state at each step's newline (a ``head`` PRM:
   a second model reads prompt + answer), or, with ``--self``, the generator's own last hidden state at
   the position that emitted each step's newline (a ``self:`` head: the engine computes it as it
   generates, a dot product per token).

The head (a few KB) is written to ``--out`` with its AUROC; the committed ones are ``head:chain-sum`` and
``self:chain-sum``.
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
    parser.add_argument("--max-tokens", type=positive_int, default=256)
    parser.add_argument(
        "--self",
        dest="self_head",
        action="store_true",
        help="fit a self: head on the generator's own hidden states (--base is ignored)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: the committed head:chain-sum or self:chain-sum)",
    )
    parser.set_defaults(run=lambda args, rest: run_train_prm(args))


def sample_traces(generator: str, problems: int, n: int, max_tokens: int) -> list[dict]:
    """``n`` sampled candidates per problem: prompt and answer as text and token ids, problem index."""
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
    return [
        {
            "prompt": prompts[i],
            "answer": c.text,
            "problem": i,
            "prompt_ids": list(out.prompt_token_ids),
            "output_ids": list(c.token_ids),
        }
        for i, out in enumerate(outs)
        for c in out.outputs
    ]


def _labelled(examples, traces: list[dict]):
    """(features, labels, problem of each) from per-trace (features [steps, d], labels), judged steps only."""
    feats, labels, groups = [], [], []
    for t, (x, ys) in zip(traces, examples):
        keep = [i for i, y in enumerate(ys) if y is not None]
        if keep:
            feats.append(x[keep])
            labels += [ys[i] for i in keep]
            groups += [t["problem"]] * len(keep)
    return feats, labels, groups


def head_features(base: str, traces: list[dict]):
    """For a ``head`` PRM on ``base``'s hidden states at each step's newline."""
    from flopwise.prm.hf import HeadPRM
    from flopwise.prm.train import step_labels

    prm = HeadPRM("untrained", None, {"base": base, "layer": -1})
    examples = []
    for t in traces:
        steps, ys = step_labels(t["answer"])
        examples.append((prm.features(t["prompt"], steps) if steps else None, ys))
    return _labelled(examples, traces)


def self_features(generator: str, traces: list[dict]):
    """For a ``self:`` head on the generator's own hidden states; -> also the generator's config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flopwise.prm.train import self_examples
    from flopwise.techniques.early_rejection import newline_ids

    tok = AutoTokenizer.from_pretrained(generator)
    model = AutoModelForCausalLM.from_pretrained(generator, dtype=torch.float32).eval()
    examples = self_examples(
        model,
        [(t["prompt_ids"], t["output_ids"]) for t in traces],
        newline_ids(tok),
        lambda ids: tok.decode(ids, skip_special_tokens=True),
    )
    return (*_labelled(examples, traces), model.config)


def run_train_prm(args) -> int:
    import torch

    from flopwise.prm import self_head
    from flopwise.prm.hf import CONFIG, save_head
    from flopwise.prm.train import auroc, fit_head
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
    if args.self_head:
        feats, labels, groups, config = self_features(generator, traces)
    else:
        feats, labels, groups = head_features(args.base, traces)
    if not feats:
        raise SystemExit("flopwise train-prm: the verifier judged no step of the sampled traces")
    x, y, g = torch.cat(feats), torch.tensor(labels), torch.tensor(groups)
    held = set(random.Random(0).sample(range(args.problems), args.problems // 5))
    test = torch.tensor([int(p) in held for p in g.tolist()])
    if y[~test].unique().numel() < 2:
        raise SystemExit("flopwise train-prm: the training steps are all right or all wrong; sample more")
    weight, bias = fit_head(x[~test], y[~test])
    train_auc = auroc(x[~test] @ weight + bias, y[~test])
    test_auc = auroc(x[test] @ weight + bias, y[test])
    info = {
        "trained_on": f"{int((~test).sum())} steps of {args.problems - len(held)} chain_sum problems (seed "
        f"{TRACE_SEED}, {args.samples} samples each, max {args.max_tokens} tokens)",
        "step_auroc_heldout": round(test_auc, 4),
        "step_auroc_train": round(train_auc, 4),
        "heldout_steps": int(test.sum()),
        "heldout_positive_rate": round(y[test].float().mean().item(), 3),
        "generator": Path(generator).name,
        "seconds": round(time.time() - t0),
    }
    if args.self_head:
        out = self_head.save(
            args.out or self_head.BUILTIN["chain-sum"],
            config.architectures[0],
            config.hidden_size,
            weight,
            bias,
            **info,
        )
    else:
        out = save_head(args.out or "src/flopwise/prm/heads/chain-sum", args.base, weight, bias, -1, **info)
    print(
        f"train-prm: held-out step AUROC {test_auc:.3f} (train {train_auc:.3f}) on {int(test.sum())} steps; "
        f"wrote {out / CONFIG}"
    )
    print(json.dumps(info, indent=1))
    return 0
