"""Neural PRMs run in-process with transformers: a step-tag checkpoint, or a linear head on a causal LM.

Both are named by a directory holding ``flopwise_prm.json``:

* ``{"type": "step-tag", "step_tag": "ки", "good": "+", "bad": "-"}`` beside a causal-LM checkpoint: the
  common open format (Math-Shepherd and its descendants). Each step is followed by the step tag; the
  step's score is P(good) among {good, bad} at the tag's position.
* ``{"type": "head", "base": PATH_OR_"default", "layer": -1}`` plus ``head.safetensors`` (``weight [d]``,
  ``bias [1]``): a logistic head on the base model's hidden state at each step's last token (its
  newline), trained by ``flopwise train-prm``. ``"default"`` is the embedded SmolLM2.

Both charge the ledger's cost of their forward pass (whole prompt + steps every call: no cache is
kept between checkpoints, so the charge is what really ran).
"""

from __future__ import annotations

import json
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


class _CausalLMPRM(ProcessRewardModel):
    def __init__(self, name: str, model_path: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.ledger = FlopModel.from_pretrained(model_path)

    def _encode(self, prompt: str, steps: list[str], sep: str) -> tuple[torch.Tensor, list[int]]:
        """Token ids of prompt + steps (each followed by ``sep``) and the index of each step's last token."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ends = []
        for step in steps:
            ids += self.tokenizer(step + sep, add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        return torch.tensor([ids]), ends


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
        hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[self.layer][0]
        return hidden[ends].float()

    def score_steps(self, prompt: str, steps: list[str]) -> list[float | None]:
        return torch.sigmoid(self.features(prompt, steps) @ self.weight + self.bias).tolist()

    def flops(self, prompt: str, steps: list[str]) -> int:
        n = len(self._encode(prompt, steps, "\n")[0][0])
        return self.ledger.forward(n, start=0, logits=0).total + 2 * self.weight.numel() * len(steps)


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

    @torch.no_grad()
    def score_steps(self, prompt: str, steps: list[str]) -> list[float | None]:
        ids, ends = self._encode(prompt, steps, f" {self.tag}\n")
        # The tag is followed by "\n" in the text; its score sits on the tag token, one before the newline.
        tag_pos = [e - 1 for e in ends]
        logits = self.model(input_ids=ids).logits[0, tag_pos][:, self.good_bad].float()
        return logits.softmax(-1)[:, 0].tolist()

    def flops(self, prompt: str, steps: list[str]) -> int:
        n = len(self._encode(prompt, steps, f" {self.tag}\n")[0][0])
        return self.ledger.forward(n, start=0, logits=len(steps)).total


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
