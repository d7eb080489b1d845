"""Reasoning tasks with exact answers (from ``reasoning-gym``) in one step-per-line format.

A solution writes one operation per line (``12 + 7 = 19``) and ends with ``Answer: <number>``, so the
arithmetic verifier (:mod:`flopwise.prm.arithmetic`) can check every step and the answer is read back
exactly. Used by the generator fine-tune, the PRM training script and ``flopwise bench early-rejection``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "Solve step by step: one operation per line, then write 'Answer: <number>'."
_ANSWER = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)")
_TERM = re.compile(r"([+-])\s*(\d+)")


@dataclass(frozen=True)
class Problem:
    expression: str  # "57 + 87 - 70"
    answer: str

    def messages(self) -> list[dict]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Compute {self.expression}."},
        ]

    def prompt(self, tokenizer) -> str:
        """The chat prompt text the generator is given (and trained on)."""
        return tokenizer.apply_chat_template(self.messages(), tokenize=False, add_generation_prompt=True)

    def solution(self) -> str:
        """The reference step-per-line solution (left to right, as chain_sum's expressions are)."""
        first, *rest = self.expression.split(" ", 1)
        value, lines = int(first), []
        for op, num in _TERM.findall(rest[0] if rest else ""):
            new = value + int(num) if op == "+" else value - int(num)
            lines.append(f"{value} {op} {num} = {new}")
            value = new
        return "\n".join([*lines, f"Answer: {value}"])


def chain_sum(
    size: int, seed: int, min_terms: int = 12, max_terms: int = 15, max_digits: int = 1
) -> list[Problem]:
    """``reasoning-gym``'s chain_sum problems (integers, + and -), deterministic in ``seed``.

    The defaults are the early-rejection task: 12-15 one-digit terms make step-per-line answers of about
    120 tokens (11-14 steps), long enough that stopping a candidate early saves most of its cost, and the
    fine-tuned generator gets about a third of them right in one sample (two-digit terms: 16%).
    """
    import reasoning_gym

    ds = reasoning_gym.create_dataset(
        "chain_sum",
        size=size,
        seed=seed,
        min_terms=min_terms,
        max_terms=max_terms,
        min_digits=1,
        max_digits=max_digits,
    )
    return [
        Problem(e["question"].rsplit(":", 1)[-1].strip().rstrip("=").strip(), str(e["answer"])) for e in ds
    ]


def extract_answer(text: str) -> str | None:
    m = _ANSWER.search(text)
    return m.group(1) if m else None


def is_correct(problem: Problem, text: str) -> bool:
    return extract_answer(text) == problem.answer


def generator_dir() -> Path:
    """Where ``bench/scripts/finetune_chain_sum.py`` writes the fine-tuned generator."""
    from flopwise.models import cache_dir

    return cache_dir() / "models" / "SmolLM2-135M-chainsum-long"
