"""Neural PRMs run in-process with transformers: a step-tag checkpoint, or a linear head on a causal LM.

Both are named by a directory holding ``flopwise_prm.json``:

* ``{"type": "step-tag", "step_tag": "ки", "good": "+", "bad": "-"}`` beside a causal-LM checkpoint: the
  common open format (Math-Shepherd and its descendants). Each step is followed by the step tag; the
  step's score is P(good) among {good, bad} at the tag's position.
* ``{"type": "head", "base": PATH_OR_"default", "layer": -1}`` plus ``head.safetensors`` (``weight [d]``,
  ``bias [1]``): a logistic head on the base model's hidden state at each step's last token (its
  newline), trained by ``flopwise train-prm``. ``"default"`` is the embedded SmolLM2.

Both keep each candidate's KV cache between its checkpoints (the ``key`` the scheduler passes: the
request id), so checkpoint k reads only the text written since checkpoint k-1, and earlier steps keep the
scores they had (a causal LM's outputs at a position do not depend on what follows). Each call charges the
ledger's cost of the forward pass it ran: the new tokens over the cached context. At most
``max_sessions`` candidates keep a cache (the least recently scored goes first, and its next call reads
everything again, charged so).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flopwise.ledger import FlopModel
from flopwise.prm.base import PRMError, ProcessRewardModel

CONFIG = "flopwise_prm.json"
HEAD = "head.safetensors"


def read_config(path: str | Path) -> dict:
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise PRMError(
            f"early_rejection.prm={str(path)!r}: no {CONFIG} in that directory (not a flopwise PRM)"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("type") not in ("step-tag", "head"):
        raise PRMError(
            f"early_rejection.prm={str(path)!r}: {CONFIG} type must be 'step-tag' or 'head', got "
            f"{cfg.get('type')!r}"
        )
    return cfg


@dataclass
class _Session:
    """One candidate's state between calls: the ids read, their KV cache, the scores of their steps."""

    ids: list[int] = field(default_factory=list)
    cache: object | None = None
    scores: list[float] = field(default_factory=list)


class _CausalLMPRM(ProcessRewardModel):
    max_sessions = 256  # candidates whose KV cache is kept

    def __init__(self, name: str, model_path: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.ledger = FlopModel.from_pretrained(model_path)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def release(self, key: str) -> None:
        self._sessions.pop(key, None)

    def _start(self, key: str | None, ids: list[int], ends: list[int]) -> int:
        """How many of ``ids`` the session ``key`` has read already (0: none kept, or another text)."""
        sess = self._sessions.get(key) if key is not None else None
        if sess is None or ids[: len(sess.ids)] != sess.ids:
            return 0
        start = len(sess.ids)
        return start if len(sess.scores) == sum(e < start for e in ends) else 0

    def _new(self, key: str | None, ids: list[int], ends: list[int]) -> tuple[int, int]:
        """(tokens the next call reads, steps it scores)."""
        start = self._start(key, ids, ends)
        return len(ids) - start, sum(e >= start for e in ends)

    @torch.no_grad()
    def _run(self, key: str | None, ids: list[int], ends: list[int], read, **kwargs) -> list[float]:
        """Scores of the steps ending at ``ends``: earlier steps' from the session, the new ones by
        ``read(model output, their rows in it)`` after a forward pass over the ids not read yet."""
        start = self._start(key, ids, ends)
        sess = self._sessions.pop(key) if start else _Session()
        old = sess.scores[: sum(e < start for e in ends)]
        new, cache = [], sess.cache
        if start < len(ids):
            out = self.model(
                input_ids=torch.tensor([ids[start:]]),
                past_key_values=cache,
                use_cache=key is not None,
                **kwargs,
            )
            new, cache = read(out, [e - start for e in ends if e >= start]), out.past_key_values
        if key is not None:
            self._sessions[key] = _Session(ids, cache, old + new)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return old + new

    def _encode(self, prompt: str, steps: list[str], sep: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt + steps (each followed by ``sep``: prompt and steps are tokenized apart, so
        the ids of an answer extend those of its prefix) and the index of each step's last token."""
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ends = []
        for step in steps:
            ids += self.tokenizer(step + sep, add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        return ids, ends


class HeadPRM(_CausalLMPRM):
    """A logistic head on hidden states of a causal LM at each step's closing newline."""

    def __init__(self, name: str, path: Path | None, cfg: dict):
        from safetensors.torch import load_file

        from flopwise import hw
        from flopwise.models import resolve_model

        base = resolve_model(None if cfg.get("base", "default") == "default" else cfg["base"])
        # bf16 where the CPU has it (3-7x faster); the head reads the hidden states in fp32
        super().__init__(
            name,
            base,
            torch.bfloat16 if cfg.get("dtype", hw.default_dtype()) == "bfloat16" else torch.float32,
        )
        self.layer = int(cfg.get("layer", -1))
        if path is None:  # untrained: only features() is meaningful (flopwise train-prm fits the head)
            self.weight, self.bias = torch.zeros(self.model.config.hidden_size), torch.zeros(1)
            return
        head = load_file(str(path / HEAD))
        self.weight, self.bias = head["weight"].float(), head["bias"].float()

    @torch.no_grad()
    def features(self, prompt: str, steps: list[str]) -> torch.Tensor:
        """[steps, d] hidden states the head reads (also what ``flopwise train-prm`` fits on)."""
        ids, ends = self._encode(prompt, steps, "\n")
        out = self.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        return out.hidden_states[self.layer][0][ends].float()

    def score_steps(self, prompt: str, steps: list[str], key: str | None = None) -> list[float | None]:
        def read(out, rows):
            hidden = out.hidden_states[self.layer][0][rows].float()
            return torch.sigmoid(hidden @ self.weight + self.bias).tolist()

        ids, ends = self._encode(prompt, steps, "\n")
        return self._run(key, ids, ends, read, output_hidden_states=True)

    def flops(self, prompt: str, steps: list[str], key: str | None = None) -> int:
        ids, ends = self._encode(prompt, steps, "\n")
        tokens, new_steps = self._new(key, ids, ends)
        if not tokens:
            return 0
        forward = self.ledger.forward(tokens, start=len(ids) - tokens, logits=0).total
        return forward + 2 * self.weight.numel() * new_steps


class StepTagPRM(_CausalLMPRM):
    """Math-Shepherd format: P(good | step tag) from the LM head, restricted to the good/bad tokens."""

    def __init__(self, name: str, path: Path, cfg: dict):
        super().__init__(name, str(path), torch.float32)
        self.tag = cfg.get("step_tag", "ки")
        vocab = self.tokenizer.get_vocab()
        try:
            self.good_bad = [vocab[cfg.get("good", "+")], vocab[cfg.get("bad", "-")]]
        except KeyError as e:
            raise PRMError(
                f"early_rejection.prm={name!r}: label token {e} is not in the tokenizer's vocabulary"
            ) from None

    def score_steps(self, prompt: str, steps: list[str], key: str | None = None) -> list[float | None]:
        def read(out, rows):
            # The tag is followed by "\n" in the text; its score sits on the tag token, before the newline.
            logits = out.logits[0, [r - 1 for r in rows]][:, self.good_bad].float()
            return logits.softmax(-1)[:, 0].tolist()

        ids, ends = self._encode(prompt, steps, f" {self.tag}\n")
        return self._run(key, ids, ends, read)

    def flops(self, prompt: str, steps: list[str], key: str | None = None) -> int:
        ids, ends = self._encode(prompt, steps, f" {self.tag}\n")
        tokens, new_steps = self._new(key, ids, ends)
        if not tokens:
            return 0
        return self.ledger.forward(tokens, start=len(ids) - tokens, logits=new_steps).total


def load(path: str, name: str | None = None) -> ProcessRewardModel:
    cfg = read_config(Path(path).expanduser())
    return (HeadPRM if cfg["type"] == "head" else StepTagPRM)(name or path, Path(path).expanduser(), cfg)


def save_head(
    out: str | Path, base: str, weight: torch.Tensor, bias: torch.Tensor, layer: int = -1, **info
) -> Path:
    """Write a head PRM directory (``flopwise_prm.json`` + ``head.safetensors``), atomically."""
    from safetensors.torch import save_file

    from flopwise.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        save_file(
            {"weight": weight.float().contiguous(), "bias": bias.float().reshape(1).contiguous()},
            str(tmp / HEAD),
        )
        (tmp / CONFIG).write_text(
            json.dumps({"type": "head", "base": base, "layer": layer, **info}, indent=1) + "\n"
        )
    return Path(out)
