"""Early rejection of partial candidates with a process reward model (or the generator's own signals).

"Accelerating LLM Reasoning via Early Rejection with Partial Reward Modeling" (arXiv:2508.01969): of N
candidates generated together, score the partial answers every ``every_tokens`` tokens with a PRM and
stop the weak ones, so compute goes to the promising ones. Defaults follow the paper's partial beam
search (check every 64 tokens, keep half).

The rule, shared by the vLLM scheduler (:mod:`flopwise_vllm.early_rejection`) and the plain-HF reference
below: candidates advance in lock-step; a checkpoint happens when every live candidate (not finished,
not rejected) has reached checkpoint ``c``: ``c * every_tokens`` tokens, or, with ``every_steps``, ``c *
every_steps`` complete steps (lines; ``every_tokens`` then caps the wait for a candidate that writes no
newline). There the live ones are scored and :meth:`EarlyRejectionConfig.kept` decides who lives. The
keep rules (any combination; a candidate must pass every rule given):

* ``keep`` - the best fraction of the live ones (ties go to the lower index); 0.5 when no rule is given;
* ``threshold`` - an absolute score below which a candidate goes (a right-so-far candidate under the
  exact verifier scores 1, one with a wrong step 0: ``threshold: 0.5`` stops exactly the wrong ones);
* ``margin`` - candidates more than this below the best live score go;
* ``percentile`` - DeepConf's warm-up: the first checkpoint's scores set a cut (this percentile of
  them) that holds at that checkpoint and every later one;

and ``min_keep`` best candidates always stay. Once no rule can reject among the live ones (a lone
``keep`` whose count equals the live number, or ``min_keep`` live candidates), no later checkpoint is
held. Finished candidates get a final score on their complete answer; the answer to return is the best
finished candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flopwise.prm import ProcessRewardModel
from flopwise.techniques import OptionError

FIELD = "early_rejection"
STOP_REASON = "early_rejection"


class EarlyRejectionConfig(BaseModel):
    """The ``early_rejection`` request object (and ``--early-rejection`` server default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prm: str = Field(
        "verifier:arithmetic", description="PRM name or directory that scores partial candidates."
    )
    every_tokens: int = Field(64, ge=1, description="Tokens generated between checkpoints.")
    every_steps: int | None = Field(
        None,
        ge=1,
        description="Checkpoint every this many complete steps (lines) "
        "instead; a candidate also reaches a checkpoint after c * every_tokens tokens.",
    )
    keep: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of live candidates kept at each checkpoint (0.5 when no other rule is given).",
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Reject live candidates whose score is below this."
    )
    margin: float | None = Field(
        None, ge=0, description="Reject live candidates scoring more than this below the best live one."
    )
    percentile: float | None = Field(
        None,
        gt=0,
        lt=100,
        description="DeepConf warm-up: this percentile of the first checkpoint's scores is the cut "
        "below which candidates are rejected there and at every later checkpoint.",
    )
    min_keep: int = Field(1, ge=1, description="Never keep fewer live candidates than this.")
    confidence_window: int = Field(
        64,
        ge=1,
        description="prm 'confidence'/'confidence:tail' only: tokens per window of the group confidence.",
    )
    confidence_top_k: int = Field(
        20, ge=1, le=20, description="prm 'confidence'/'confidence:tail' only: top tokens per confidence."
    )
    mode: Literal["reject", "beam"] = Field(
        "reject",
        description="'reject' stops weak candidates; 'beam' would also "
        "fork survivors to refill the width (not implemented in the engine).",
    )

    @property
    def fraction(self) -> float | None:
        """The ``keep`` fraction in force (the default 0.5 only when no score rule is given)."""
        if self.keep is not None:
            return self.keep
        return None if self.scored_rules else 0.5

    @property
    def scored_rules(self) -> bool:
        """Whether a rule that looks at score values (not only their order) is given."""
        return self.threshold is not None or self.margin is not None or self.percentile is not None

    def keep_count(self, live: int) -> int:
        fraction = self.fraction
        if fraction is None:
            return live
        return min(live, max(self.min_keep, math.ceil(fraction * live - 1e-9)))

    def reached(self, checkpoint: int, tokens: int, steps: int) -> bool:
        """Whether a candidate with ``tokens`` generated, ``steps`` of them complete, is at checkpoint
        ``checkpoint``."""
        if self.every_steps is not None and steps >= checkpoint * self.every_steps:
            return True
        return tokens >= checkpoint * self.every_tokens

    def rejects_at(self, live: int) -> bool:
        """Whether a checkpoint with ``live`` candidates can reject any (monotone: false for all smaller
        ``live``)."""
        if self.scored_rules:
            return live > self.min_keep
        return self.keep_count(live) < live

    def warmup_cut(self, scores: list[float]) -> float | None:
        """The ``percentile`` cut set by the first checkpoint's ``scores`` (None without the rule)."""
        if self.percentile is None or not scores:
            return None
        return percentile(scores, self.percentile)

    def kept(self, scores: list[float], cut: float | None = None) -> list[int]:
        """Indices (into ``scores``, in index order) of the candidates that live on; ``cut`` is the
        warm-up cut (:meth:`warmup_cut` of the first checkpoint)."""
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        alive = set(order[: self.keep_count(len(scores))])
        if self.threshold is not None:
            alive = {i for i in alive if scores[i] >= self.threshold}
        if self.margin is not None and scores:
            best = max(scores)
            alive = {i for i in alive if scores[i] >= best - self.margin}
        if cut is not None:
            alive = {i for i in alive if scores[i] >= cut}
        for i in order:  # min_keep: the best of the rejected come back
            if len(alive) >= min(self.min_keep, len(scores)):
                break
            alive.add(i)
        return sorted(alive)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` with linear interpolation (numpy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class ConfigError(OptionError):
    """A bad ``early_rejection`` object; ``field`` is the path of the offending field."""


def parse_config(raw, prefix: str = FIELD) -> EarlyRejectionConfig:
    """Validate an ``early_rejection`` object; the error names the field as ``prefix.field`` (``field`` if no
    prefix)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the value'} must be an object, got {type(raw).__name__}", prefix)
    try:
        return EarlyRejectionConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join([*([prefix] if prefix else []), *map(str, err["loc"])])
        raise ConfigError(f"{field}: {err['msg']} (got {err.get('input')!r})", field) from None


def newline_ids(tokenizer) -> frozenset[int]:
    """Token ids whose text holds a newline: a step ends with each (counts steps without decoding)."""
    return frozenset(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))


def survivors(scores: list[float], count: int) -> list[int]:
    """Indices (into ``scores``) of the ``count`` best, ties to the lower index, in index order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


@dataclass
class Candidate:
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    rejected_at: int | None = None  # checkpoint number (1-based) that rejected it
    score: float | None = None  # last PRM score: at rejection, or final


@dataclass
class ReferenceResult:
    candidates: list[Candidate]
    checkpoints: int = 0
    prm_flops: int = 0
    first_scores: list[float] = field(default_factory=list)  # the live candidates' at checkpoint 1

    @property
    def rejected(self) -> list[int]:
        return [i for i, c in enumerate(self.candidates) if c.rejected_at is not None]


@torch.no_grad()
def reference_generate(
    model,
    prompt_ids: list[int],
    prompt_text: str,
    n: int,
    config: EarlyRejectionConfig,
    prm: ProcessRewardModel | None,
    decode: Callable[[list[int]], str],
    max_tokens: int,
    eos_ids: set[int],
    sample: Callable[[int, torch.Tensor], int],
    newlines: frozenset[int] = frozenset(),
    head=None,
) -> ReferenceResult:
    """The oracle: ``n`` candidates on a plain HF causal LM, one KV cache each, rejected by the rule above.

    ``sample(candidate, logits[vocab])`` picks each next token (the test passes vLLM's seeded sampler);
    ``newlines`` (:func:`newline_ids`) counts steps for ``every_steps`` (and ends a self head's steps).
    ``prm`` is None for the scorers computed as tokens are generated: ``confidence`` (from each sampled
    position's logits) and a ``self:`` head (``head``, a :class:`flopwise.prm.self_head.SelfHead`, on each
    sampled position's last hidden state).
    """
    import copy

    from flopwise.prm import confidence, self_head

    hidden = head is not None  # the last hidden state is only read for a self head

    def forward(ids, cache=None):
        out = model(
            input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, output_hidden_states=hidden
        )
        return (
            out.past_key_values,
            out.logits[0, -1].float(),
            out.hidden_states[-1][0, -1] if hidden else None,
        )

    cache, logits, state = forward(prompt_ids)
    caches = [copy.deepcopy(cache) for _ in range(n)]
    last_logits = [logits for _ in range(n)]
    last_hidden = [state for _ in range(n)]
    cands = [Candidate() for _ in range(n)]
    confs: list[list[float]] = [[] for _ in range(n)]
    step_values = [self_head.StepValues() for _ in range(n)]  # self head only
    result = ReferenceResult(cands)
    ckpt = 1
    steps = [0] * n
    cut = None
    mode = confidence.NAMES.get(config.prm)

    def at_ckpt(i: int) -> bool:
        return config.reached(ckpt, len(cands[i].tokens), steps[i])

    def score(i: int, final: bool) -> float:
        if mode is not None:
            return confidence.score(confs[i], config.confidence_window, mode)
        if head is not None:
            return step_values[i].score(final)
        # keyed by candidate, as the engine does: the PRM reads only what was written since the last call
        s, f = prm.score(prompt_text, decode(cands[i].tokens), final=final, key=f"reference-{i}")
        result.prm_flops += f
        return s

    while True:
        live = [i for i, c in enumerate(cands) if not c.finished and c.rejected_at is None]
        if not live:
            for i in range(n if prm is not None else 0):
                prm.release(f"reference-{i}")
            return result
        if not config.rejects_at(len(live)):
            ckpt = None  # no checkpoint can reject any more: run to the end
        if ckpt is not None and all(at_ckpt(i) for i in live):
            result.checkpoints += 1
            scores = []
            for i in live:
                cands[i].score = score(i, final=False)
                scores.append(cands[i].score)
            if result.checkpoints == 1:
                cut, result.first_scores = config.warmup_cut(scores), scores
            kept = {live[j] for j in config.kept(scores, cut)}
            for i in live:
                if i not in kept:
                    cands[i].rejected_at = result.checkpoints
            ckpt += 1
            continue
        for i in live:
            if ckpt is not None and at_ckpt(i):
                continue  # held at the checkpoint until the others reach it
            if mode is not None:
                confs[i].append(confidence.from_logits(last_logits[i], config.confidence_top_k))
            token = sample(i, last_logits[i])
            cands[i].tokens.append(token)
            steps[i] += token in newlines
            if head is not None:
                value = head.values(last_hidden[i][None])[0]
                result.prm_flops += head.flops_per_token
                step_values[i].add(value, ends_step=token in newlines)
            if token in eos_ids or len(cands[i].tokens) >= max_tokens:
                cands[i].finished = True
                cands[i].score = score(i, final=True)
                continue
            caches[i], last_logits[i], last_hidden[i] = forward([token], caches[i])
