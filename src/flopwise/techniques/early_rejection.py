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

Two fields turn best-of-N into an adaptive search (``width`` with the absolute rules only):

* ``accept`` - a candidate that finishes with a final score of at least this ends the request: the live
  candidates stop (stop_reason ``early_rejection``) and those not started never start;
* ``width`` - at most this many candidates are live at once; the others wait and start one by one, in
  index order, as live ones end. Each candidate is then scored at its *own* checkpoints (no lock-step: a
  candidate that starts late never holds the others), and ``threshold`` rejects it there unless that
  would leave fewer than ``min_keep`` candidates live, waiting or finished. With ``accept`` this is
  sequential best-of-N with rejection: the request costs the candidates up to the first accepted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flopwise.prm import ProcessRewardModel, confidence, self_head
from flopwise.techniques import OptionError

FIELD = "early_rejection"
SIZE_FIELD = "early_rejection_n"  # the request's n for the engine (the front end writes it, not users)
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
    accept: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A candidate that finishes scoring at least this ends the request: the others stop.",
    )
    width: int | None = Field(
        None,
        ge=1,
        description="Run at most this many candidates at once; the others start as live ones end, and each "
        "is scored at its own checkpoints (threshold and accept only).",
    )
    mode: Literal["reject", "beam"] = Field(
        "reject",
        description="'reject' stops weak candidates; 'beam' would also "
        "fork survivors to refill the width (not implemented in the engine).",
    )

    @model_validator(mode="after")
    def _independent_rules(self):
        relative = [k for k in ("keep", "margin", "percentile") if getattr(self, k) is not None]
        if self.width is not None and relative:
            # a candidate that starts late has no peers at its checkpoints to be ranked against
            raise ValueError(
                f"width: candidates are scored on their own; use threshold/accept, not {', '.join(relative)}"
            )
        return self

    @property
    def fraction(self) -> float | None:
        """The ``keep`` fraction in force (the default 0.5 only when no other rule is given)."""
        if self.keep is not None:
            return self.keep
        if self.scored_rules or self.accept is not None or self.width is not None:
            return None
        return 0.5

    @property
    def independent(self) -> bool:
        """Whether candidates are scored at their own checkpoints (``width``), not in lock-step."""
        return self.width is not None

    def rejects_one(self, score: float, remaining: int) -> bool:
        """Independent mode: whether a candidate scoring ``score`` at its checkpoint goes, with ``remaining``
        candidates (itself included) live, waiting or finished."""
        return self.threshold is not None and score < self.threshold and remaining > self.min_keep

    def accepts(self, final_score: float | None) -> bool:
        """Whether a finished candidate with this final score ends its request."""
        return self.accept is not None and final_score is not None and final_score >= self.accept

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
        loc, msg, got = list(map(str, err["loc"])), err["msg"], f" (got {err.get('input')!r})"
        if not loc and ": " in msg:  # a rule across fields names its field first ("Value error, width: ...")
            name, msg = msg.removeprefix("Value error, ").split(": ", 1)
            loc, got = [name], ""
        field = ".".join([*([prefix] if prefix else []), *loc])
        raise ConfigError(f"{field}: {msg}{got}", field) from None


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
    # checkpoint number (1-based) that rejected it; stopped by accept: the checkpoints it had passed (0: none)
    rejected_at: int | None = None
    started: bool = True
    score: float | None = None  # last PRM score: at rejection, or final


@dataclass
class ReferenceResult:
    candidates: list[Candidate]
    checkpoints: int = 0
    prm_flops: int = 0
    first_scores: list[float] = field(default_factory=list)  # the live candidates' at checkpoint 1
    finish_order: list[int] = field(default_factory=list)  # candidates that finished on their own
    lowest: dict[int, float] = field(default_factory=dict)  # candidate -> its lowest checkpoint score

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
    """The oracle: ``n`` candidates on a plain HF causal LM, one KV cache each, rejected by the rules above.

    ``sample(candidate, logits[vocab])`` picks each next token (the test passes vLLM's seeded sampler);
    ``newlines`` (:func:`newline_ids`) counts steps for ``every_steps`` (and ends a self head's steps).
    ``prm`` is None for the scorers computed as tokens are generated: ``confidence`` (from each sampled
    position's logits) and a ``self:`` head (``head``, a :class:`flopwise.prm.self_head.SelfHead`, on each
    sampled position's last hidden state). One iteration of the loop is one engine step: the decisions on
    what the last step wrote come first (accept, checkpoints, starting waiting candidates), then every live
    candidate writes one token.
    """
    run = _Oracle(model, prompt_ids, prompt_text, n, config, prm, decode, max_tokens, eos_ids, sample)
    run.newlines, run.head = newlines, head
    run.start()
    cands, result = run.cands, run.result
    ckpt: int | None = 1  # lock-step: the checkpoint the live candidates are heading for
    waiting = list(range(config.width or n, n))
    own = [1] * n  # independent: each candidate's next checkpoint
    while True:
        live = [i for i, c in enumerate(cands) if c.started and not c.finished and c.rejected_at is None]
        if run.accepted:  # everything still running or waiting stops
            for i in live + waiting:
                cands[i].rejected_at = own[i] - 1 if config.independent else result.checkpoints
            live, waiting = [], []
        if config.independent:
            for i in [i for i in live if run.at(i, own[i])]:
                own[i] += 1
                result.checkpoints += 1
                cands[i].score = run.score(i, final=False)
                remaining = len(waiting) + sum(c.started and c.rejected_at is None for c in cands)
                if config.rejects_one(cands[i].score, remaining):
                    cands[i].rejected_at = own[i] - 1
            live = [i for i in live if cands[i].rejected_at is None]
            while waiting and len(live) < config.width:
                live.append(waiting.pop(0))
                cands[live[-1]].started = True
        if not live:
            run.release()
            return result
        if not config.independent and ckpt is not None:
            if not config.rejects_at(len(live)):
                ckpt = None  # no checkpoint can reject any more: run to the end
            elif all(run.at(i, ckpt) for i in live):
                result.checkpoints += 1
                scores = []
                for i in live:
                    cands[i].score = run.score(i, final=False)
                    scores.append(cands[i].score)
                if result.checkpoints == 1:
                    run.cut, result.first_scores = config.warmup_cut(scores), scores
                kept = {live[j] for j in config.kept(scores, run.cut)}
                for i in live:
                    if i not in kept:
                        cands[i].rejected_at = result.checkpoints
                ckpt += 1
                continue
        for i in live:
            if ckpt is not None and not config.independent and run.at(i, ckpt):
                continue  # held at the checkpoint until the others reach it
            run.advance(i)


class _Oracle:
    """The oracle's candidates: their caches, tokens, step counts and scores."""

    def __init__(self, model, prompt_ids, prompt_text, n, config, prm, decode, max_tokens, eos_ids, sample):
        self.model, self.prompt_ids, self.prompt_text = model, prompt_ids, prompt_text
        self.config, self.prm, self.decode, self.sample = config, prm, decode, sample
        self.max_tokens, self.eos_ids = max_tokens, eos_ids
        self.newlines: frozenset[int] = frozenset()
        self.head = None
        self.cands = [Candidate(started=i < (config.width or n)) for i in range(n)]
        self.result = ReferenceResult(self.cands)
        self.cut: float | None = None
        self.accepted = False

    def forward(self, ids, cache=None):
        hidden = self.head is not None  # the last hidden state is only read for a self head
        out = self.model(
            input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, output_hidden_states=hidden
        )
        return (
            out.past_key_values,
            out.logits[0, -1].float(),
            out.hidden_states[-1][0, -1] if hidden else None,
        )

    def start(self) -> None:
        import copy

        n = len(self.cands)
        cache, logits, state = self.forward(self.prompt_ids)
        # a candidate that starts late samples from the same prompt state (the engine: a prefix-cache hit)
        self.caches = [copy.deepcopy(cache) for _ in range(n)]
        self.last = [(logits, state) for _ in range(n)]
        self.confs: list[list[float]] = [[] for _ in range(n)]
        self.step_values = [self_head.StepValues() for _ in range(n)]  # self head only
        self.steps = [0] * n
        self.mode = confidence.NAMES.get(self.config.prm)

    def at(self, i: int, checkpoint: int) -> bool:
        return self.config.reached(checkpoint, len(self.cands[i].tokens), self.steps[i])

    def score(self, i: int, final: bool) -> float:
        if self.mode is not None:
            s = confidence.score(self.confs[i], self.config.confidence_window, self.mode)
        elif self.head is not None:
            s = self.step_values[i].score(final)
        else:
            # keyed by candidate, as the engine does: the PRM reads only what was written since the last call
            text = self.decode(self.cands[i].tokens)
            s, f = self.prm.score(self.prompt_text, text, final=final, key=f"reference-{i}")
            self.result.prm_flops += f
        if not final:
            self.result.lowest[i] = min(s, self.result.lowest.get(i, s))
        return s

    def advance(self, i: int) -> None:
        """Candidate ``i`` writes one token (and is scored if that ends its answer)."""
        cand, (logits, state) = self.cands[i], self.last[i]
        if self.mode is not None:
            self.confs[i].append(confidence.from_logits(logits, self.config.confidence_top_k))
        token = self.sample(i, logits)
        cand.tokens.append(token)
        self.steps[i] += token in self.newlines
        if self.head is not None:
            self.result.prm_flops += self.head.flops_per_token
            self.step_values[i].add(self.head.values(state[None])[0], ends_step=token in self.newlines)
        if token in self.eos_ids or len(cand.tokens) >= self.max_tokens:
            cand.finished = True
            self.result.finish_order.append(i)
            cand.score = self.score(i, final=True)
            self.accepted |= self.config.accepts(cand.score)
            return
        self.caches[i], logits, state = self.forward([token], self.caches[i])
        self.last[i] = (logits, state)

    def release(self) -> None:
        if self.prm is not None:
            for i in range(len(self.cands)):
                self.prm.release(f"reference-{i}")
