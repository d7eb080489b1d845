"""The process-reward-model interface: a prompt plus a (partial) answer split into steps -> a score per step.

Steps are lines. A partial answer's last line is still being written, so only lines ended by a newline
are steps, unless the answer is final. A step score is the probability that the step is correct, or
``None`` where a model cannot judge it (the rule-based verifier on a line with no equation). A
candidate's score is the minimum over its judged steps (Math-Shepherd's aggregation; one wrong step
sinks the whole solution), 0.5 when no step could be judged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

NEUTRAL = 0.5


class PRMError(ValueError):
    """A PRM that cannot be named, loaded or run; the message names the ``early_rejection.prm`` field."""


def split_steps(answer: str, final: bool) -> list[str]:
    """The complete steps of ``answer``: lines ended by a newline, plus the last line when ``final``."""
    lines = answer.split("\n")
    last = lines.pop()
    steps = [line for line in lines if line.strip()]
    if final and last.strip():
        steps.append(last)
    return steps


def aggregate(step_scores: list[float | None]) -> float:
    judged = [s for s in step_scores if s is not None]
    return min(judged) if judged else NEUTRAL


class ProcessRewardModel(ABC):
    """Scores steps. A ``key`` names one candidate across calls: a PRM may keep that candidate's state
    between them (the neural ones keep its KV cache, so a call costs only the text added since the last),
    until :meth:`release`; without a key every call starts from nothing. Any process may hold one."""

    name: str

    @abstractmethod
    def score_steps(self, prompt: str, steps: list[str], key: str | None = None) -> list[float | None]:
        """One score per step of the answer to ``prompt``."""

    def flops(self, prompt: str, steps: list[str], key: str | None = None) -> int:
        """FLOPs the next :meth:`score_steps` call costs (0 for rule-based verifiers)."""
        return 0

    def release(self, key: str) -> None:
        """Forget what is kept for candidate ``key`` (it is finished or rejected); stateless PRMs keep
        nothing."""
        return None

    def cost(self, prompt: str, answer: str, final: bool = False, key: str | None = None) -> int:
        """FLOPs :meth:`score` will spend on this answer (known before it runs, for budgets)."""
        steps = split_steps(answer, final)
        return self.flops(prompt, steps, key) if steps else 0

    def score(
        self, prompt: str, answer: str, final: bool = False, key: str | None = None
    ) -> tuple[float, int]:
        """(candidate score, FLOPs spent) for a partial (or ``final``) answer."""
        steps = split_steps(answer, final)
        if not steps:
            return NEUTRAL, 0
        spent = self.flops(prompt, steps, key)  # before scoring: it measures what the call will add
        return aggregate(self.score_steps(prompt, steps, key)), spent
