"""Early rejection inside the engine: the scheduler side of :mod:`flopwise.techniques.early_rejection`.

The candidates of an n>1 request are vLLM's own children (``{index}_{parent}``), generated together in
one batch. The scheduler holds each child that has reached the next checkpoint (leaves it out of the
step, its KV blocks kept) until every live sibling has; then the PRM scores the partial answers and the
weak children are finished on the spot (finish_reason ``abort``, stop_reason ``early_rejection``), their
KV blocks freed at once. Everything runs in the engine process, so decisions are exact and synchronous:
no candidate runs past a checkpoint while the PRM decides, and no work goes uncharged.

A PRM that fails (cannot load, raises) turns rejection off for that request; it is served in full and the
stats say why. PRM FLOPs are charged to the group (and its budget); a scoring pass that would cross the
budget is skipped rather than run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from flopwise.prm import ProcessRewardModel, load_prm
from flopwise.techniques import early_rejection as er

logger = logging.getLogger("flopwise")


def parse_config(raw) -> er.EarlyRejectionConfig | None:
    """The config the front end forwarded in ``extra_args`` (a JSON string, or a dict from Python callers)."""
    if raw is None:
        return None
    return er.parse_config(json.loads(raw) if isinstance(raw, str) else raw)


@dataclass
class Rejection:
    """Early-rejection state of one group (one client request's n candidates)."""

    config: er.EarlyRejectionConfig
    next_checkpoint: int = 1  # 1-based index of the checkpoint the candidates are heading for
    active: bool = True
    started: int = 0
    checkpoints: int = 0
    prm_flops: int = 0
    error: str | None = None
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> latest score
    rejected: dict[int, int] = field(default_factory=dict)  # candidate index -> checkpoint that rejected it
    lengths: dict[int, int] = field(default_factory=dict)  # candidate index -> tokens generated when it ended
    _prm: ProcessRewardModel | None = None

    def prm(self) -> ProcessRewardModel:
        if self._prm is None:
            self._prm = load_prm(self.config.prm)
        return self._prm

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
            "scores": {str(i): s for i, s in sorted(self.scores.items())},
            "rejected_at": {str(i): c for i, c in sorted(self.rejected.items())},
        }
        if self.error:
            out["error"] = self.error
        return out
