"""One early-rejection group's state (:mod:`flopwise_vllm.early_rejection` decides with it) and the stats
its payload reports."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from vllm.v1.request import Request

from flopwise.prm import ProcessRewardModel, is_confidence, load_prm, self_head
from flopwise.techniques import early_rejection as er
from flopwise_vllm.accountant import Group

logger = logging.getLogger("flopwise")


@dataclass
class Rejection:
    """Early-rejection state of one group (one client request's n candidates)."""

    config: er.EarlyRejectionConfig
    group: Group
    next_checkpoint: int = 1  # 1-based index of the checkpoint the candidates are heading for
    active: bool = True
    started: int = 0  # children that have arrived
    checkpoints: int = 0
    prm_flops: int = 0
    prm_seconds: float = 0.0  # spent in a text PRM inside schedule(), while the whole engine waits
    error: str | None = None
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> latest score
    rejected: dict[int, int] = field(default_factory=dict)  # candidate index -> checkpoint that rejected it
    lengths: dict[int, int] = field(default_factory=dict)  # candidate index -> tokens generated when it ended
    cut: float | None = None  # the percentile rule's cut, set by the first checkpoint
    size: int | None = None  # the client request's n (None: not known; its children start as they come)
    opened: float = field(default_factory=time.monotonic)  # when the first child arrived
    parked: list[Request] = field(default_factory=list)  # children not started yet, in index order
    own: dict[int, int] = field(default_factory=dict)  # width: candidate index -> its next checkpoint
    accepted: int | None = None  # the candidate whose final score met ``accept``
    finished: set[int] = field(default_factory=set)  # candidates that finished on their own
    # candidate index -> its tokens' confidences (confidence scorers only)
    confidences: dict[int, list[float]] = field(default_factory=dict)
    # candidate index -> a self head's logits (self scorers only)
    step_values: dict[int, self_head.StepValues] = field(default_factory=dict)
    # candidate index -> (output tokens counted, step ends among them): each test reads only new tokens
    _steps: dict[int, tuple[int, int]] = field(default_factory=dict)
    _prm: ProcessRewardModel | None = None

    @property
    def by_confidence(self) -> bool:
        return is_confidence(self.config.prm)

    @property
    def by_self(self) -> bool:
        return self_head.is_self(self.config.prm)

    def prm(self) -> ProcessRewardModel:
        if self._prm is None:
            self._prm = load_prm(self.config.prm)
        return self._prm

    def steps(self, index: int, output_token_ids, newlines: frozenset[int]) -> int:
        """Step ends (newlines) candidate ``index`` has written, counting only the tokens new since the last
        call; output tokens only grow (a preempted request keeps them), a shorter list is recounted."""
        counted, steps = self._steps.get(index, (0, 0))
        if counted > len(output_token_ids):
            counted, steps = 0, 0
        steps += sum(t in newlines for t in output_token_ids[counted:])
        self._steps[index] = (len(output_token_ids), steps)
        return steps

    def fail(self, what: str, error: Exception | str) -> None:
        self.active = False
        self.error = f"{what}: {error}"
        logger.warning("flopwise early rejection off for one request: %s", self.error)

    def stats(self) -> dict:
        finished = [n for i, n in self.lengths.items() if i not in self.rejected]
        mean = sum(finished) / len(finished) if finished else 0.0
        saved = sum(max(0.0, mean - self.lengths.get(i, 0)) for i in self.rejected)
        out = {
            "prm": self.config.prm,
            "started": self.started,
            "rejected": len(self.rejected),
            "checkpoints": self.checkpoints,
            "tokens_saved": round(saved),
            "prm_flops": self.prm_flops,
            "prm_s": round(self.prm_seconds, 4),
            "scores": {str(i): s for i, s in sorted(self.scores.items())},
            "rejected_at": {str(i): c for i, c in sorted(self.rejected.items())},
        }
        if self.config.accept is not None:
            out["accepted"] = self.accepted
        if self.config.width is not None:
            out["never_started"] = sum(n == 0 and i in self.rejected for i, n in self.lengths.items())
        if self.cut is not None:
            out["cut"] = self.cut
        if self.error:
            out["error"] = self.error
        return out
