"""Process reward models: score a prompt plus a partial answer, step by step.

Names accepted wherever a PRM is named (``early_rejection.prm``, ``--prm``):

* ``verifier:arithmetic`` - the exact rule-based step verifier (:mod:`flopwise.prm.arithmetic`);
* ``confidence`` / ``confidence:tail`` - the generator's own token confidence (:mod:`flopwise.prm.confidence`,
  DeepConf): no model of its own, computed by the engine from the logits it has;
* ``self:<head>`` - a value head on the generator's own last hidden state (:mod:`flopwise.prm.self_head`):
  a dot product per token, computed by the engine; ``self:chain-sum`` is the committed one;
* ``head:chain-sum`` - the committed learned head on SmolLM2-135M (``flopwise train-prm`` makes it);
* a directory with ``flopwise_prm.json`` (:mod:`flopwise.prm.hf`): a step-tag checkpoint or a head.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flopwise.prm import confidence, self_head
from flopwise.prm.arithmetic import ArithmeticVerifier
from flopwise.prm.base import NEUTRAL, PRMError, ProcessRewardModel, aggregate, split_steps

BUILTIN_HEADS = {"head:chain-sum": Path(__file__).parent / "heads" / "chain-sum"}
VERIFIERS = {ArithmeticVerifier.name: ArithmeticVerifier}


def resolve(name: str) -> str:
    """Check a PRM name without loading weights (cheap: the server calls it per request)."""
    if not isinstance(name, str) or not name:
        raise PRMError(f"early_rejection.prm must be a PRM name or path, got {name!r}")
    if name in VERIFIERS or name in confidence.NAMES:
        return name
    if self_head.is_self(name):
        self_head.read_config(name)
        return name
    if name in BUILTIN_HEADS:
        return str(BUILTIN_HEADS[name])
    if name.startswith("verifier:"):
        raise PRMError(f"early_rejection.prm={name!r}: unknown verifier; known: {', '.join(VERIFIERS)}")
    if name.startswith("confidence"):
        raise PRMError(
            f"early_rejection.prm={name!r}: unknown confidence scorer; known: {', '.join(confidence.NAMES)}"
        )
    from flopwise.prm.hf import read_config

    if not Path(name).expanduser().is_dir():
        known = ", ".join([*VERIFIERS, *confidence.NAMES, *BUILTIN_HEADS, "self:<head>"])
        raise PRMError(f"early_rejection.prm={name!r}: not a known PRM ({known}) nor a PRM directory")
    read_config(name)
    return name


def is_confidence(name: str) -> bool:
    """Whether ``name`` scores with the generator's own confidence (no text PRM to load)."""
    return name in confidence.NAMES


def in_engine(name: str) -> bool:
    """Whether the engine computes ``name``'s scores as it generates (confidence, a self head): no PRM
    reads the text."""
    return is_confidence(name) or self_head.is_self(name)


@lru_cache(maxsize=4)
def load_prm(name: str) -> ProcessRewardModel:
    """The PRM called ``name`` (loaded once per process); not for :func:`in_engine` names."""
    resolved = resolve(name)
    if in_engine(resolved):
        raise PRMError(f"early_rejection.prm={name!r} is computed by the engine, not loaded")
    if resolved in VERIFIERS:
        return VERIFIERS[resolved]()
    from flopwise.prm.hf import load

    return load(resolved, name)


__all__ = [
    "NEUTRAL",
    "PRMError",
    "ProcessRewardModel",
    "aggregate",
    "confidence",
    "in_engine",
    "is_confidence",
    "load_prm",
    "resolve",
    "self_head",
    "split_steps",
]
