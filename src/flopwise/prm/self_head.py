"""``self:<head>``: a value head on the generator's own last hidden state (no model of its own).

A linear head ``w . h + b`` reads the hidden state the generator's LM head reads (after its final norm) at
each position it samples from, so a score costs one dot product, charged as ``2 * hidden`` FLOPs per
generated token, not a model call. The engine computes it in its worker from the hidden states the model
runner already holds (:mod:`flopwise_vllm.self_values`); the plain-HF oracle from ``hidden_states[-1]``.

A *step* ends where the generator emits a newline token; its value is the head's at the position that
emitted it (the state that has read the whole line), and on a finished answer also at the position that
emitted the last token. A candidate's score is the lowest sigmoid over its steps so far (Math-Shepherd's
aggregation, as for the other PRMs), 0.5 before its first step.

A head is a directory with ``flopwise_prm.json`` (``{"type": "self", "architecture": ..., "hidden_size":
...}``) and ``head.safetensors`` (``weight [hidden]``, ``bias [1]``), written by ``flopwise train-prm --self``
(labels from the arithmetic verifier: right so far). It names the architecture and hidden size it was fitted
on and refuses any other model. ``self:chain-sum`` is the committed head on the chain_sum generator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from flopwise.prm.base import NEUTRAL, PRMError, split_steps

PREFIX = "self:"
TYPE = "self"
CONFIG = "flopwise_prm.json"
HEAD = "head.safetensors"
BUILTIN = {"chain-sum": Path(__file__).parent / "heads" / "self-chain-sum"}


def is_self(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def head_dir(name: str) -> Path:
    """The directory behind ``self:<head>`` (a committed head's name, or a path)."""
    rest = name[len(PREFIX) :]
    if rest in BUILTIN:
        return BUILTIN[rest]
    return Path(rest).expanduser()


def read_config(name: str) -> dict:
    """A head's ``flopwise_prm.json`` (cheap: no weights); PRMError naming the field if it is not one."""
    path = head_dir(name)
    cfg_path = path / CONFIG
    if not name[len(PREFIX) :] or not cfg_path.is_file() or not (path / HEAD).is_file():
        known = ", ".join(PREFIX + k for k in BUILTIN)
        raise PRMError(
            f"early_rejection.prm={name!r}: not a self head (known: {known}; or self:DIR with {CONFIG} and "
            f"{HEAD}, written by flopwise train-prm --self)"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type") != TYPE or not isinstance(cfg.get("hidden_size"), int) or not cfg.get("architecture"):
        raise PRMError(
            f"early_rejection.prm={name!r}: {cfg_path} is not a self head's config (type 'self', "
            "architecture, hidden_size)"
        )
    return cfg


def check_fits(name: str, architecture: str, hidden: int) -> None:
    """Refuse a head fitted on another model (PRMError naming ``early_rejection.prm``)."""
    cfg = read_config(name)
    if (cfg["architecture"], cfg["hidden_size"]) != (architecture, hidden):
        raise PRMError(
            f"early_rejection.prm={name!r}: this head reads the hidden states of a {cfg['architecture']} "
            f"with hidden size {cfg['hidden_size']}; the served model is a {architecture} with hidden size "
            f"{hidden}"
        )


@dataclass(frozen=True)
class SelfHead:
    name: str
    architecture: str
    hidden: int
    weight: torch.Tensor  # [hidden], float32
    bias: float

    @property
    def flops_per_token(self) -> int:
        """FLOPs of one value: the dot product (a multiply and an add per hidden unit)."""
        return 2 * self.hidden

    def values(self, hidden_states: torch.Tensor) -> list[float]:
        """The head's logit at each row of ``hidden_states`` [rows, hidden]."""
        return (hidden_states.float() @ self.weight + self.bias).tolist()


@lru_cache(maxsize=8)
def load(name: str) -> SelfHead:
    """The head ``self:<head>`` names (loaded once per process)."""
    from safetensors.torch import load_file

    cfg = read_config(name)
    tensors = load_file(str(head_dir(name) / HEAD))
    weight, bias = tensors["weight"].float().reshape(-1), float(tensors["bias"].reshape(-1)[0])
    if weight.numel() != cfg["hidden_size"]:
        raise PRMError(
            f"early_rejection.prm={name!r}: head.safetensors has {weight.numel()} weights for hidden size "
            f"{cfg['hidden_size']}"
        )
    return SelfHead(name, cfg["architecture"], cfg["hidden_size"], weight, bias)


def score(step_values: list[float]) -> float:
    """A candidate's score from its steps' head logits: the lowest probability, NEUTRAL with none."""
    if not step_values:
        return NEUTRAL
    return 1.0 / (1.0 + math.exp(-min(step_values)))


@dataclass
class StepValues:
    """One candidate's head values as its tokens come: one per step end (a newline token), and the
    latest token's while it ends no step (a value only once the answer is final)."""

    ended: list[float] = field(default_factory=list)
    latest: float | None = None

    def add(self, value: float, ends_step: bool) -> None:
        if ends_step:
            self.ended.append(value)
        self.latest = None if ends_step else value

    def values(self, final: bool) -> list[float]:
        return self.ended + ([self.latest] if final and self.latest is not None else [])

    def score(self, final: bool) -> float:
        return score(self.values(final))


def step_rows(output_ids: list[int], newlines: frozenset[int], final: bool) -> list[int]:
    """Indices j of the output tokens whose emitting position is a step value (the rule of
    :class:`StepValues`, which training shares): each newline token, and the last token of a ``final``
    answer that does not end on one."""
    rows = StepValues()
    for j, t in enumerate(output_ids):
        rows.add(j, t in newlines)
    return rows.values(final)


def prefix_label(text: str, final: bool) -> int | None:
    """Right so far: 1 while every equation in ``text``'s complete steps holds, 0 once one does not, None
    before any step is judged (the verifier's process-supervision label)."""
    from flopwise.prm.arithmetic import check_line

    verdicts = [check_line(s) for s in split_steps(text, final)]
    if any(v == 0.0 for v in verdicts):
        return 0
    return 1 if any(v is not None for v in verdicts) else None


def save(
    out: str | Path, architecture: str, hidden: int, weight: torch.Tensor, bias: torch.Tensor, **info
) -> Path:
    """Write a self head directory, atomically."""
    from safetensors.torch import save_file

    from flopwise.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        save_file(
            {"weight": weight.float().reshape(-1).contiguous(), "bias": bias.float().reshape(1).contiguous()},
            str(tmp / HEAD),
        )
        cfg = {"type": TYPE, "architecture": architecture, "hidden_size": hidden, **info}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    return Path(out)
