"""Pick an early-rejection threshold for a scorer on problems the benchmark never sees.

Runs best-of-8 (``keep: 1``: nothing rejected) with the scorer on chain_sum problems of seed 3000 (the
fine-tune's are 1000, the heads' 2000 (``train-prm``), the benchmark's 7) and reads each finished
candidate's final score, the lowest over its lines: a ``threshold`` rule rejects a candidate exactly when
that score falls below it (before ``min_keep``). For each threshold it prints the share of right and of
wrong answers that would survive, the accuracy of the verifier's pick among the survivors (a problem counts
if a right answer survives), and, for an ``accept`` level, how often an answer scored at least that is
right. Usage:

    python bench/scripts/calibrate_threshold.py [--prm self:chain-sum] [--problems 60]
"""

from __future__ import annotations

import argparse
import json

from flopwise.reasoning import chain_sum, generator_dir, is_correct
from flopwise.techniques.early_rejection import EarlyRejectionConfig
from flopwise_serve.offline import LLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prm", default="self:chain-sum")
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=3000, help="chain_sum problem seed")
    args = parser.parse_args()
    from vllm import SamplingParams

    llm = LLM(str(generator_dir()), max_model_len=512, block_size=32, seed=0, enable_chunked_prefill=False)
    problems = chain_sum(args.problems, seed=args.seed)
    tok = llm.get_tokenizer()
    config = EarlyRejectionConfig(prm=args.prm, keep=1.0)
    params = [
        SamplingParams(
            n=args.n,
            temperature=0.8,
            max_tokens=256,
            seed=100 * p,
            extra_args={"early_rejection": config.model_dump_json()},
        )
        for p in range(len(problems))
    ]
    outs = llm.engine.generate([p.prompt(tok) for p in problems], params, use_tqdm=False)
    llm.shutdown()
    rows = []  # per problem: [(score, right)]
    for problem, out in zip(problems, outs):
        scores = out.ec_transfer_params["flopwise"]["early_rejection"]["scores"]
        rows.append([(scores[str(c.index)], is_correct(problem, c.text)) for c in out.outputs])
    cands = [c for r in rows for c in r]
    right = sum(ok for _, ok in cands)
    print(f"{args.prm}: {len(problems)} problems x {args.n}; {right} of {len(cands)} answers right")
    table = []
    for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        kept_right = sum(s >= t and ok for s, ok in cands) / max(1, right)
        kept_wrong = sum(s >= t and not ok for s, ok in cands) / max(1, len(cands) - right)
        acc = sum(any(s >= t and ok for s, ok in r) for r in rows) / len(rows)
        # as an ``accept`` level: how often an answer scored at least t is right
        above = [ok for s, ok in cands if s >= t]
        precision = sum(above) / len(above) if above else None
        table.append(
            {
                "threshold": t,
                "right_kept": kept_right,
                "wrong_kept": kept_wrong,
                "accuracy": acc,
                "precision": precision,
            }
        )
        shown = "-" if precision is None else f"{precision:.2f}"
        print(
            f"  threshold {t:.2f}: right kept {kept_right:.2f}, wrong kept {kept_wrong:.2f}, acc {acc:.3f}, "
            f"right among those kept {shown}"
        )
    print(f"  no rejection: accuracy {sum(any(ok for _, ok in r) for r in rows) / len(rows):.3f}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
